//! The host-gw backend, as flannel's: every peer subnet is routed via the peer's PublicIP on
//! the uplink. It needs all nodes on one L2 segment, and the PublicIP must be the uplink's own
//! address (behind NAT the peers could not reach it as a gateway).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use rtnetlink::packet_route::route::RouteProtocol;
use tracing::{debug, info, warn};

use super::{DataplaneError, LeaseAttrs, LocalLease, combine_errors, netlink_error};
use crate::{
    os::iface::Uplink,
    os::netlink::{Netlink, Route},
    peer::{Peer, PeerEvent},
};

/// The host-gw dataplane (`--backend=host-gw`).
#[derive(Debug)]
pub struct HostGwDataplane {
    netlink: Netlink,
    uplink: Uplink,
    lease: Option<LocalLease>,
    /// Peer subnet -> its PublicIP: the routes `maintain` keeps in place.
    peers: BTreeMap<Ipv4Network, Ipv4Addr>,
}

impl HostGwDataplane {
    /// Checks that the uplink's own address is the public IP (flannel refuses to start
    /// otherwise) and returns the dataplane with the lease attributes to publish.
    pub async fn new(uplink: Uplink) -> Result<(Self, LeaseAttrs), DataplaneError> {
        let netlink = Netlink::connect().map_err(netlink_error("opening netlink"))?;
        let own = netlink
            .addresses(Some(uplink.index))
            .await
            .map_err(netlink_error(format!(
                "listing the addresses of {}",
                uplink.name
            )))?;
        let own_ips: Vec<String> = own.iter().map(|a| a.address.ip().to_string()).collect();
        if !own.iter().any(|a| a.address.ip() == uplink.public_ip) {
            return Err(DataplaneError::PublicIpNotOnUplink {
                public_ip: uplink.public_ip,
                uplink: uplink.name.clone(),
                owned: if own_ips.is_empty() {
                    "none".to_owned()
                } else {
                    own_ips.join(", ")
                },
            });
        }
        Ok((
            HostGwDataplane {
                netlink,
                uplink,
                lease: None,
                peers: BTreeMap::new(),
            },
            LeaseAttrs::HostGw,
        ))
    }

    /// The MTU pods should use (FLANNEL_MTU): host-gw adds no header.
    pub fn mtu(&self) -> u32 {
        self.uplink.mtu
    }

    fn route(&self, subnet: Ipv4Network, public_ip: Ipv4Addr) -> Route {
        Route {
            destination: subnet,
            gateway: Some(public_ip),
            oif: Some(self.uplink.index),
            onlink: false,
        }
    }

    async fn program(
        &self,
        subnet: Ipv4Network,
        public_ip: Ipv4Addr,
    ) -> Result<(), DataplaneError> {
        let route = self.route(subnet, public_ip);
        self.netlink.replace_route(&route).await.map_err(|source| {
            // ENETUNREACH: the gateway is not on a connected subnet of the uplink.
            if source.errno() == Some(101) {
                DataplaneError::PeerNotOnSegment {
                    subnet,
                    public_ip,
                    uplink: self.uplink.name.clone(),
                }
            } else {
                netlink_error(format!(
                    "programming route {subnet} via {public_ip} dev {}",
                    self.uplink.name
                ))(source)
            }
        })
    }

    async fn upsert(&mut self, peer: &Peer) -> Result<(), DataplaneError> {
        if self
            .lease
            .as_ref()
            .is_some_and(|lease| lease.subnet == peer.subnet)
            || peer.public_ip == self.uplink.public_ip
        {
            debug!(subnet = %peer.subnet, "ignoring our own lease");
            return Ok(());
        }
        self.program(peer.subnet, peer.public_ip).await?;
        if self.peers.insert(peer.subnet, peer.public_ip) != Some(peer.public_ip) {
            info!(subnet = %peer.subnet, public_ip = %peer.public_ip, "peer added");
        }
        Ok(())
    }

    async fn remove(&mut self, subnet: Ipv4Network) -> Result<(), DataplaneError> {
        let Some(public_ip) = self.peers.get(&subnet).copied() else {
            return Ok(());
        };
        self.netlink
            .delete_route(&self.route(subnet, public_ip))
            .await
            .map_err(netlink_error(format!(
                "removing the route to peer {subnet}"
            )))?;
        self.peers.remove(&subnet);
        info!(%subnet, "peer removed");
        Ok(())
    }

    /// Mark-and-sweep: upsert the snapshot, then delete routes on the uplink into the cluster
    /// network via a gateway that no peer accounts for (ours, proto boot). Others' routes
    /// (other tables, protocols, devices, destinations outside the network) are left alone.
    async fn snapshot(&mut self, peers: &[Peer]) -> Result<(), DataplaneError> {
        let mut errors = Vec::new();
        for peer in peers {
            if let Err(err) = self.upsert(peer).await {
                errors.push(err);
            }
        }
        let gone = super::stale_subnets(self.peers.keys(), peers);
        for subnet in gone {
            if let Err(err) = self.remove(subnet).await {
                errors.push(err);
            }
        }
        if let Some(lease) = &self.lease {
            match self.netlink.routes().await {
                Ok(routes) => {
                    for listed in routes {
                        let route = listed.route;
                        let stale = route.oif == Some(self.uplink.index)
                            && route.gateway.is_some()
                            && listed.protocol == RouteProtocol::Boot
                            && lease.network.contains(route.destination.network())
                            && route.destination.prefix() >= lease.network.prefix()
                            && route.destination != lease.subnet
                            && !self.peers.contains_key(&route.destination);
                        if stale {
                            info!(route = %route, "removing stale route");
                            if let Err(err) = self.netlink.delete_route(&route).await {
                                errors.push(
                                    netlink_error(format!("removing stale route {route}"))(err),
                                );
                            }
                        }
                    }
                }
                Err(err) => errors.push(netlink_error("listing routes for the resync")(err)),
            }
        }
        combine_errors("resync", errors)
    }
}

impl super::Dataplane for HostGwDataplane {
    fn name(&self) -> &'static str {
        "host-gw"
    }

    async fn activate(&mut self, lease: &LocalLease) -> Result<(), DataplaneError> {
        self.lease = Some(lease.clone());
        if let Some(public_ip) = self.peers.remove(&lease.subnet) {
            self.netlink
                .delete_route(&self.route(lease.subnet, public_ip))
                .await
                .map_err(netlink_error(format!(
                    "removing the route to our own subnet {}",
                    lease.subnet
                )))?;
        }
        Ok(())
    }

    async fn apply(&mut self, event: &PeerEvent) -> Result<(), DataplaneError> {
        match event {
            PeerEvent::Upsert(peer) => self.upsert(peer).await,
            PeerEvent::Remove(subnet) => self.remove(*subnet).await,
            PeerEvent::Snapshot(peers) => self.snapshot(peers).await,
        }
    }

    /// Restores routes someone deleted.
    async fn maintain(&mut self) -> Result<(), DataplaneError> {
        if self.peers.is_empty() {
            return Ok(());
        }
        let routes = self
            .netlink
            .routes()
            .await
            .map_err(netlink_error("listing routes"))?;
        let mut errors = Vec::new();
        for (subnet, public_ip) in &self.peers {
            let present = routes.iter().any(|listed| {
                listed.route.destination == *subnet
                    && listed.route.gateway == Some(*public_ip)
                    && listed.route.oif == Some(self.uplink.index)
            });
            if !present {
                warn!(%subnet, via = %public_ip, "route to peer was missing (deleted by someone?); restoring it");
                if let Err(err) = self.program(*subnet, *public_ip).await {
                    errors.push(err);
                }
            }
        }
        combine_errors("restoring routes", errors)
    }
}
