//! The kernel vxlan backend, exactly as flanneld programs it.
//!
//! Device `flannel.<VNI>` (vxlan id VNI, dstport, local = uplink address, dev = uplink,
//! nolearning, MTU = underlay MTU - 50, a random locally administered MAC chosen once), address
//! `<our subnet network>/32`. Each remote host gets exactly one neighbour, one FDB entry and
//! one route: the route sends the peer subnet to the gateway `<peer subnet network>` on the
//! device (onlink), the permanent neighbour resolves that gateway to the peer's VtepMAC (no
//! ARP across the overlay), and the FDB entry says behind which underlay IP that MAC lives
//! (so nothing floods and nothing is learned).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::Ipv4Addr,
};

use futures_util::{StreamExt, stream};
use ipnetwork::Ipv4Network;
use tracing::{debug, info, warn};

use super::{
    DataplaneError, LeaseAttrs, LocalLease,
    changes::{ChangeFeed, Changes},
    combine_errors, netlink_error,
};
use crate::{
    control::config::BackendConfig,
    os::iface::Uplink,
    os::netlink::{KernelChange, Link, Netlink, NetlinkError, Route, VxlanSpec},
    os::nexthop::{Nexthop, Nexthops},
    peer::{MacAddr6, Peer, PeerEvent},
};

use overlay_common::VXLAN_OVERHEAD;

/// How one remote peer is programmed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Programmed {
    /// Through the vxlan device: neighbour + FDB + onlink route.
    Vxlan {
        gateway: Ipv4Addr,
        vtep_mac: MacAddr6,
        public_ip: Ipv4Addr,
    },
    /// DirectRouting: the peer shares our L2 segment; a plain route via its PublicIP.
    Direct { public_ip: Ipv4Addr },
}

/// The device's fixed settings, derived from the config and the uplink.
#[derive(Clone, Debug, PartialEq, Eq)]
struct DeviceSettings {
    name: String,
    vni: u32,
    port: u16,
    mtu: u32,
    learning: bool,
    gbp: bool,
}

/// The kernel vxlan dataplane (`--backend=vxlan`, and the device the eBPF backend sits on).
#[derive(Debug)]
pub struct VxlanDataplane {
    netlink: Netlink,
    /// A socket of its own for FDB entries (and flannel's routes on a kernel without
    /// nexthop objects), so a first sync's FDB
    /// requests run beside its neighbour requests instead of behind them.
    fdb: Netlink,
    /// Writes peer routes: flannel's gateway routes, or through nexthop objects.
    routes: RouteWriter,
    uplink: Uplink,
    settings: DeviceSettings,
    direct_routing: bool,
    /// Index of our `flannel.<VNI>` device (changes when it is re-created).
    device_index: u32,
    /// Kept across device re-creation, and across restarts by reusing the device.
    vtep_mac: MacAddr6,
    lease: Option<LocalLease>,
    /// What we have programmed per peer subnet: the desired state `maintain` restores.
    peers: BTreeMap<Ipv4Network, Programmed>,
    /// The kernel's notifications, shared with a dataplane stacked on this one. Joined
    /// after the first snapshot is programmed (or at `join_by`, when none comes): the first
    /// sync's own 40,000 writes at 10,000 peers are not worth hearing of.
    feed: ChangeFeed,
    join_by: std::time::Instant,
    /// What this dataplane repairs from: deletions and link changes (when the subscription
    /// failed or broke, every tick is a full check, as before there were events).
    changes: Changes,
    /// Whether the first snapshot's sweep of leftovers (from before a restart) has run.
    swept: bool,
    /// Peers whose route goes through an interim nexthop object for now (see
    /// [`RouteForm::Interim`]), to be rewritten in flannel's form as deferred work.
    interim_routes: BTreeSet<Ipv4Network>,
    /// When deferred work may run again after it failed (not in a tight loop).
    rewrite_after: tokio::time::Instant,
    /// What rewriting one interim route took in the last group (sizes the next one).
    rewrite_cost: std::time::Duration,
}

/// What the kernel holds of this backend's kinds of state, from one dump each.
struct KernelState {
    routes: Vec<crate::os::netlink::ListedRoute>,
    neighbours: Vec<crate::os::netlink::Neighbour>,
    fdb: Vec<crate::os::netlink::FdbEntry>,
    /// Nexthop objects on our device and the uplink (with --nexthop-objects, and on the
    /// first sweep, which removes those a run with it left).
    nexthops: Vec<Nexthop>,
}

/// A dump's peer state by key: routes by destination, neighbours and FDB entries as sets.
struct HeldState<'a> {
    routes: HashMap<Ipv4Network, &'a crate::os::netlink::ListedRoute>,
    neighbours: HashSet<(Ipv4Addr, Option<MacAddr6>)>,
    fdb: HashSet<(MacAddr6, Option<Ipv4Addr>)>,
}

impl<'a> HeldState<'a> {
    fn of(state: &'a KernelState) -> Self {
        HeldState {
            routes: state
                .routes
                .iter()
                .map(|listed| (listed.route.destination, listed))
                .collect(),
            neighbours: state.neighbours.iter().map(|n| (n.ip, n.mac)).collect(),
            fdb: state.fdb.iter().map(|e| (e.mac, e.dst)).collect(),
        }
    }
}

/// How many netlink requests a bulk programming pass keeps in flight: enough for the kernel
/// to work back to back instead of waiting for our round trips, well below what fills the
/// socket's receive buffer with acknowledgements.
const REQUESTS_IN_FLIGHT: usize = 128;

/// When the change notifications start if no snapshot came by then (etcd unreachable at
/// start, say): the device and our lease's entries are repaired from events from then on.
const JOIN_CHANGES_AT_THE_LATEST: std::time::Duration = std::time::Duration::from_secs(10);

/// From how many peers new routes in flannel's layout are written through an interim
/// nexthop object first. Below it the kernel's cost of a flannel route is small (1,000 peers:
/// ~0.1 ms an insert) and routes are written in their final form at once.
pub const INTERIM_FROM_PEERS: usize = 1_000;

/// How long one piece of deferred work (rewriting interim routes) may hold the dataplane
/// task: a peer event that arrives meanwhile waits at most this and one route insert.
const DEFERRED_WORK_SLICE: std::time::Duration = std::time::Duration::from_millis(10);

/// How long deferred work waits after it failed before it tries again.
const DEFERRED_WORK_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// How a route is written now. `Final`: in the layout the node runs (flannel's, or with
/// `--nexthop-objects` through a nexthop object). `Interim`, in flannel's layout only: the
/// same gateway and device through a nexthop object, as `--nexthop-objects` writes it, then
/// rewritten in flannel's form when the dataplane task is idle. The kernel compares every
/// flannel route with every earlier one on insert (10,000 peers: 3 s for the routes alone;
/// one more route at 20,000: ~4.5 ms), a route through a nexthop object with none; forwarding
/// is the same. So at scale the peers are reachable first and the routes take flannel's
/// exact form after, instead of the node waiting for the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RouteForm {
    Final,
    Interim,
}

/// The nexthop object id of a peer's route: its subnet's network address, which no other
/// peer shares (leases do not overlap) and which a restarted agent derives again without
/// keeping state. `ip route` shows it as `nhid 168100608` for 10.5.3.0.
pub fn nexthop_id(subnet: Ipv4Network) -> u32 {
    u32::from(subnet.network())
}

/// Writes and deletes peer routes in the layout the node runs: flannel's own (`<subnet> via
/// <gateway> dev <device> [onlink]`, the default), or with `--nexthop-objects` the same
/// gateway and device in a nexthop object and a route `<subnet> nhid <id>` through it.
/// Forwarding is the same; what differs is the kernel's cost to insert: every flannel route
/// is compared with every earlier one (10,000 peers: ~2 s, 20,000: ~10 s), a route through
/// a nexthop object is not.
#[derive(Clone, Debug)]
struct RouteWriter {
    netlink: Netlink,
    /// `--nexthop-objects`: every peer route goes through its nexthop object.
    nexthops: Option<Nexthops>,
    /// For interim routes, when the kernel has nexthop objects (see [`RouteForm`]).
    interim: Option<Nexthops>,
}

impl RouteWriter {
    /// The nexthop socket, when there is one (for listing and deleting our objects).
    fn any_nexthops(&self) -> Option<&Nexthops> {
        self.nexthops.as_ref().or(self.interim.as_ref())
    }

    /// The nexthop socket a route in `form` goes through; None: flannel's own route.
    fn nexthops_for(&self, form: RouteForm) -> Option<&Nexthops> {
        self.nexthops.as_ref().or(match form {
            RouteForm::Interim => self.interim.as_ref(),
            RouteForm::Final => None,
        })
    }

    async fn replace(&self, route: &Route, form: RouteForm) -> Result<(), NetlinkError> {
        let Some(nexthops) = self.nexthops_for(form) else {
            return self.netlink.replace_route(route).await;
        };
        let id = nexthop_id(route.destination);
        nexthops.replace(&nexthop_of(route)).await?;
        self.netlink
            .replace_route_via_nexthop(route.destination, id)
            .await
    }

    async fn delete(&self, route: &Route, form: RouteForm) -> Result<(), NetlinkError> {
        let Some(nexthops) = self.nexthops_for(form) else {
            return self.netlink.delete_route(route).await;
        };
        // The route first, so its deletion is announced (`ip monitor route`); deleting the
        // object would take it along silently.
        let id = nexthop_id(route.destination);
        self.netlink
            .delete_route_via_nexthop(route.destination, id)
            .await?;
        nexthops.delete(id).await
    }

    /// Whether `listed` is `wanted` written in `form`.
    fn holds(
        &self,
        listed: &crate::os::netlink::ListedRoute,
        wanted: &Route,
        form: RouteForm,
    ) -> bool {
        let layout = self
            .nexthops_for(form)
            .map(|_| nexthop_id(wanted.destination));
        listed.route.destination == wanted.destination
            && listed.route.gateway == wanted.gateway
            && listed.route.oif == wanted.oif
            && listed.nexthop_id == layout
    }
}

/// The nexthop object a route's gateway and device go into.
fn nexthop_of(route: &Route) -> Nexthop {
    Nexthop {
        id: nexthop_id(route.destination),
        gateway: route.gateway,
        oif: route.oif.unwrap_or(0),
        onlink: route.onlink,
    }
}

/// A nexthop socket for interim routes, when this kernel has nexthop objects (5.3 and
/// later); without them every route is written in its final form.
async fn interim_nexthops(device: u32) -> Option<Nexthops> {
    let probed = match Nexthops::connect() {
        Ok(nexthops) => nexthops.list(&[device]).await.map(|_| nexthops),
        Err(err) => Err(err),
    };
    probed
        .inspect_err(|err| debug!(error = %err, "no nexthop objects: large syncs write flannel's routes directly"))
        .ok()
}

impl VxlanDataplane {
    /// Creates `flannel.<VNI>` on `uplink` as flannel does, or reuses an existing device
    /// whose settings match (keeping its MAC, so the lease's VtepMAC is stable across
    /// restarts); a device with other settings is replaced. Returns the lease attributes
    /// to publish.
    pub async fn new(
        uplink: Uplink,
        backend: &BackendConfig,
    ) -> Result<(Self, LeaseAttrs), DataplaneError> {
        let underlay_mtu = backend.mtu.unwrap_or(uplink.mtu);
        // One minimum for both places that check it (config validation and here, for an
        // uplink's own MTU).
        if underlay_mtu < crate::control::config::MIN_BACKEND_MTU {
            return Err(DataplaneError::UnderlayMtuTooSmall {
                mtu: underlay_mtu,
                uplink: uplink.name.clone(),
                from_config: backend.mtu.is_some(),
            });
        }
        let settings = DeviceSettings {
            name: format!("flannel.{}", backend.vni),
            vni: backend.vni,
            port: backend.port,
            mtu: underlay_mtu - VXLAN_OVERHEAD,
            learning: backend.learning,
            gbp: backend.gbp,
        };
        let netlink = Netlink::connect().map_err(netlink_error("opening netlink"))?;
        let feed = ChangeFeed::start_unjoined();
        // Route additions are our own writes, mostly: a deleted route is what needs repair.
        let changes = feed.subscribe(|change| !matches!(change, KernelChange::RouteAdded(_)));
        let fdb = Netlink::connect().map_err(netlink_error("opening netlink"))?;
        let mut dataplane = VxlanDataplane {
            // flannel's routes share the FDB socket: both hold the RTNL lock, and each such
            // route insert holds it long (see docs/control-plane.md), so a second socket
            // only spins waiting for it, on the CPU the neighbour requests need (10,000
            // peers: 2.9 s against 3.6-4.0 s). Routes through nexthop objects (interim or
            // `--nexthop-objects`) are quick: they get their own socket.
            routes: RouteWriter {
                netlink: fdb.clone(),
                nexthops: None,
                interim: None,
            },
            fdb,
            netlink,
            uplink,
            settings,
            direct_routing: backend.direct_routing,
            device_index: 0,
            vtep_mac: random_vtep_mac(),
            lease: None,
            peers: BTreeMap::new(),
            feed,
            join_by: std::time::Instant::now() + JOIN_CHANGES_AT_THE_LATEST,
            changes,
            swept: false,
            interim_routes: BTreeSet::new(),
            rewrite_after: tokio::time::Instant::now(),
            rewrite_cost: std::time::Duration::from_millis(5),
        };
        dataplane.ensure_device(true).await?;
        dataplane.routes.interim = interim_nexthops(dataplane.device_index).await;
        if dataplane.routes.interim.is_some() {
            // Routes through nexthop objects (interim, or all with --nexthop-objects) are
            // quick inserts: beside the FDB requests, not behind them (10,000 peers with
            // --nexthop-objects: 0.82 s against 0.85-0.91 s sharing).
            dataplane.routes.netlink =
                Netlink::connect().map_err(netlink_error("opening netlink"))?;
        }
        let attrs = dataplane.lease_attrs();
        Ok((dataplane, attrs))
    }

    /// What our lease publishes (BackendType vxlan, VNI and VtepMAC).
    pub fn lease_attrs(&self) -> LeaseAttrs {
        LeaseAttrs::Vxlan {
            vni: self.settings.vni,
            vtep_mac: self.vtep_mac,
        }
    }

    /// Writes peer routes through nexthop objects from now on (`--nexthop-objects`; call
    /// before the first peer). Fails with a clear error on a kernel without them.
    pub async fn use_nexthop_objects(&mut self) -> Result<(), DataplaneError> {
        // `new` found nexthop objects already (the interim socket, and a route socket of
        // its own beside it): those serve.
        let nexthops = match self.routes.interim.take() {
            Some(nexthops) => nexthops,
            None => {
                let nexthops =
                    Nexthops::connect().map_err(netlink_error("opening a nexthop socket"))?;
                if let Err(err) = nexthops.list(&[self.device_index]).await {
                    return Err(DataplaneError::NexthopObjectsUnsupported { source: err });
                }
                nexthops
            }
        };
        match Nexthops::deletions() {
            Ok((deletions, membership)) => self.feed.add_source(deletions, membership),
            Err(err) => {
                warn!(error = %err, "cannot subscribe to nexthop notifications; a deleted nexthop object is restored by the full check only")
            }
        }
        info!("peer routes go through nexthop objects (--nexthop-objects)");
        self.routes.nexthops = Some(nexthops);
        Ok(())
    }

    /// The device's name (`flannel.<VNI>`).
    pub fn device_name(&self) -> &str {
        &self.settings.name
    }

    /// The device's MTU (what subnet.env's FLANNEL_MTU says).
    pub fn mtu(&self) -> u32 {
        self.settings.mtu
    }

    fn matches(&self, link: &Link) -> bool {
        let Some(vxlan) = &link.vxlan else {
            return false;
        };
        vxlan.vni == self.settings.vni
            && vxlan.local == Some(self.uplink.address)
            && vxlan.dev == Some(self.uplink.index)
            && vxlan.port == self.settings.port
            && vxlan.learning == self.settings.learning
            && vxlan.gbp == self.settings.gbp
    }

    /// Makes sure the device exists with our settings. On the first call an existing
    /// matching device's MAC is adopted; later calls re-create it with our MAC.
    /// Returns true when the device was (re)created, i.e. its neighbours, FDB entries,
    /// routes and address are gone.
    async fn ensure_device(&mut self, adopt_mac: bool) -> Result<bool, DataplaneError> {
        let name = self.settings.name.clone();
        let existing = self
            .netlink
            .link_by_name(&name)
            .await
            .map_err(netlink_error(format!("looking up {name}")))?;
        if let Some(link) = existing {
            if self.matches(&link) {
                if adopt_mac && let Some(mac) = link.mac {
                    self.vtep_mac = mac;
                }
                if link.mac == Some(self.vtep_mac) {
                    if link.mtu != self.settings.mtu {
                        info!(device = %name, from = link.mtu, to = self.settings.mtu, "correcting vxlan device MTU");
                        self.netlink
                            .set_link_mtu(link.index, self.settings.mtu)
                            .await
                            .map_err(netlink_error(format!("setting the MTU of {name}")))?;
                    }
                    let created = self.device_index != link.index;
                    if created {
                        info!(device = %name, index = link.index, vtep_mac = %self.vtep_mac, "reusing existing vxlan device");
                    }
                    self.device_index = link.index;
                    return Ok(created && !adopt_mac);
                }
            }
            warn!(
                device = %name,
                found = ?link.vxlan,
                "existing {name} has other settings than ours (vni {}, local {}, dev {}, dstport {}); replacing it",
                self.settings.vni, self.uplink.address, self.uplink.name, self.settings.port
            );
            self.netlink
                .delete_link(link.index)
                .await
                .map_err(netlink_error(format!("deleting mismatched {name}")))?;
        }
        let spec = VxlanSpec {
            name: name.clone(),
            vni: self.settings.vni,
            local: self.uplink.address,
            dev: self.uplink.index,
            port: self.settings.port,
            learning: self.settings.learning,
            gbp: self.settings.gbp,
            mtu: self.settings.mtu,
            mac: self.vtep_mac,
        };
        self.netlink
            .create_vxlan(&spec)
            .await
            .map_err(netlink_error(format!("creating {name}")))?;
        let link = self
            .netlink
            .link_by_name(&name)
            .await
            .map_err(netlink_error(format!(
                "looking up {name} after creating it"
            )))?
            .ok_or_else(|| DataplaneError::DeviceVanished {
                device: name.clone(),
            })?;
        self.device_index = link.index;
        info!(
            device = %name, index = link.index, vni = self.settings.vni, port = self.settings.port,
            local = %self.uplink.address, dev = %self.uplink.name, mtu = self.settings.mtu,
            vtep_mac = %self.vtep_mac, "created vxlan device"
        );
        Ok(true)
    }

    /// Our address on the device and the device up. Returns true when it had to repair
    /// either: a device that was down lost its routes (the kernel flushes them without a
    /// notification), so its peers need a full check.
    async fn program_device(&self, lease: &LocalLease) -> Result<bool, DataplaneError> {
        let name = &self.settings.name;
        let index = self.device_index;
        let wanted = Ipv4Network::new(lease.subnet.network(), 32).expect("/32 is valid");
        let present = self
            .netlink
            .addresses(Some(index))
            .await
            .map_err(netlink_error(format!("listing addresses of {name}")))?;
        // flannel keeps exactly one IPv4 address on the device: a stale one from an older
        // lease would make the kernel pick a wrong source address.
        for stale in present.iter().filter(|a| a.address != wanted) {
            info!(device = %name, address = %stale.address, "removing stale address");
            self.netlink
                .delete_address(index, stale.address)
                .await
                .map_err(netlink_error(format!(
                    "removing {} from {name}",
                    stale.address
                )))?;
        }
        let mut repaired = false;
        if !present.iter().any(|a| a.address == wanted) {
            self.netlink
                .add_address(index, wanted)
                .await
                .map_err(netlink_error(format!("adding {wanted} to {name}")))?;
            repaired = true;
        }
        // Only write when needed: this runs every maintenance tick, and a no-op write would
        // still wake every listener of link events.
        let up = self
            .netlink
            .link_by_index(index)
            .await
            .map_err(netlink_error(format!("looking up {name}")))?
            .is_some_and(|link| link.up);
        if !up {
            self.netlink
                .set_link_up(index)
                .await
                .map_err(netlink_error(format!("setting {name} up")))?;
            repaired = true;
        }
        Ok(repaired)
    }

    /// DirectRouting: is the peer's PublicIP on the uplink's own segment (the kernel routes
    /// it without a gateway, out of the uplink)?
    async fn is_direct(&self, public_ip: Ipv4Addr) -> Result<bool, DataplaneError> {
        let lookup = self
            .netlink
            .route_get(public_ip)
            .await
            .map_err(netlink_error(format!(
                "looking up the route to peer {public_ip}"
            )))?;
        Ok(lookup.gateway.is_none() && lookup.oif == Some(self.uplink.index))
    }

    fn vxlan_route(&self, subnet: Ipv4Network, gateway: Ipv4Addr) -> Route {
        Route {
            destination: subnet,
            gateway: Some(gateway),
            oif: Some(self.device_index),
            onlink: true,
        }
    }

    fn direct_route(&self, subnet: Ipv4Network, public_ip: Ipv4Addr) -> Route {
        Route {
            destination: subnet,
            gateway: Some(public_ip),
            oif: Some(self.uplink.index),
            onlink: false,
        }
    }

    /// What a peer should look like.
    async fn desired(&self, peer: &Peer) -> Result<Programmed, DataplaneError> {
        if self.direct_routing && self.is_direct(peer.public_ip).await? {
            return Ok(Programmed::Direct {
                public_ip: peer.public_ip,
            });
        }
        let vtep_mac = peer.vtep_mac.ok_or_else(|| DataplaneError::NoVtepMac {
            subnet: peer.subnet,
            public_ip: peer.public_ip,
        })?;
        Ok(Programmed::Vxlan {
            gateway: peer.subnet.network(),
            vtep_mac,
            public_ip: peer.public_ip,
        })
    }

    /// The form `subnet`'s route is in now.
    fn form_of(&self, subnet: Ipv4Network) -> RouteForm {
        if self.interim_routes.contains(&subnet) {
            RouteForm::Interim
        } else {
            RouteForm::Final
        }
    }

    /// The form for routes of `new` more peers: interim in flannel's layout from
    /// [`INTERIM_FROM_PEERS`] peers on, when the kernel has nexthop objects.
    fn form_for_new(&self, new: usize) -> RouteForm {
        if self.routes.nexthops.is_none()
            && self.routes.interim.is_some()
            && self.peers.len() + new >= INTERIM_FROM_PEERS
        {
            RouteForm::Interim
        } else {
            RouteForm::Final
        }
    }

    /// Notes the form `subnet`'s route was written in (Final also for a removed peer).
    fn record_form(&mut self, subnet: Ipv4Network, form: RouteForm) {
        let changed = match form {
            RouteForm::Interim => self.interim_routes.insert(subnet),
            RouteForm::Final => self.interim_routes.remove(&subnet),
        };
        if changed {
            super::record_interim_routes(self.interim_routes.len());
        }
    }

    /// The route a peer's state says it has.
    fn route_of(&self, subnet: Ipv4Network, programmed: Programmed) -> Route {
        match programmed {
            Programmed::Vxlan { gateway, .. } => self.vxlan_route(subnet, gateway),
            Programmed::Direct { public_ip } => self.direct_route(subnet, public_ip),
        }
    }

    /// Rewrites interim routes in flannel's form, for up to [`DEFERRED_WORK_SLICE`]: each
    /// route is replaced in place (no moment without one), then its interim nexthop object
    /// deleted. Requests go in groups, in flight together, sized by what a route cost so far
    /// to fill the slice: one at a time, the round trips (a wake-up of the netlink task per
    /// request) cost more than the kernel's work at 10,000 peers. A failure stops the slice;
    /// the route stays interim and is retried after [`DEFERRED_WORK_RETRY`].
    async fn rewrite_interim_routes(&mut self) -> Result<(), DataplaneError> {
        let started = std::time::Instant::now();
        while let Some(room) = DEFERRED_WORK_SLICE.checked_sub(started.elapsed()) {
            let cost = self.rewrite_cost.max(std::time::Duration::from_micros(10));
            let count = (room.as_micros() / cost.as_micros()).clamp(1, 64) as usize;
            let group: Vec<(Ipv4Network, Option<Route>)> = self
                .interim_routes
                .iter()
                .take(count)
                .map(|subnet| {
                    let route = self.peers.get(subnet).map(|p| self.route_of(*subnet, *p));
                    (*subnet, route)
                })
                .collect();
            if group.is_empty() {
                break;
            }
            let group_started = std::time::Instant::now();
            // Per route: the replace, then (when it worked) the deletion of its object.
            let replaced: Vec<(Ipv4Network, Result<(), NetlinkError>)> = stream::iter(group)
                .map(|(subnet, route)| {
                    let routes = self.routes.clone();
                    async move {
                        // None: the peer went meanwhile, its removal took route and object.
                        let Some(route) = route else {
                            return (subnet, Ok(()));
                        };
                        let replaced = routes.replace(&route, RouteForm::Final).await;
                        if replaced.is_ok()
                            && let Some(nexthops) = &routes.interim
                            && let Err(err) = nexthops.delete(nexthop_id(subnet)).await
                        {
                            // Unused now; the next full check sweeps it.
                            warn!(%subnet, error = %err, "could not delete the interim nexthop object of a rewritten route");
                        }
                        (subnet, replaced)
                    }
                })
                .buffer_unordered(count)
                .collect()
                .await;
            let mut failure = None;
            let mut rewritten = 0u32;
            for (subnet, result) in replaced {
                match result {
                    Ok(()) => {
                        self.record_form(subnet, RouteForm::Final);
                        rewritten += 1;
                    }
                    Err(err) => failure = failure.or(Some((subnet, err))),
                }
            }
            self.rewrite_cost = group_started.elapsed() / rewritten.max(1);
            if let Some((subnet, err)) = failure {
                self.rewrite_after = tokio::time::Instant::now() + DEFERRED_WORK_RETRY;
                return Err(netlink_error(format!(
                    "rewriting the route to peer {subnet} in flannel's form"
                ))(err));
            }
        }
        if self.interim_routes.is_empty() {
            info!(
                peers = self.peers.len(),
                "every peer route is in flannel's form"
            );
        }
        Ok(())
    }

    /// Programs one peer in flannel's order: neighbour, FDB, route (the route last, so no
    /// packet is routed to the device before the device knows where to send it).
    async fn program(
        &self,
        subnet: Ipv4Network,
        programmed: Programmed,
        previous: Option<Programmed>,
        form: RouteForm,
    ) -> Result<(), DataplaneError> {
        let device = self.device_index;
        match programmed {
            Programmed::Vxlan {
                gateway,
                vtep_mac,
                public_ip,
            } => {
                // A peer that changed VtepMAC leaves an FDB entry under its old MAC.
                if let Some(Programmed::Vxlan {
                    vtep_mac: old_mac,
                    public_ip: old_ip,
                    ..
                }) = previous
                    && old_mac != vtep_mac
                {
                    self.netlink
                        .delete_fdb(device, old_mac, Some(old_ip))
                        .await
                        .map_err(netlink_error(format!(
                            "removing old FDB entry of peer {subnet}"
                        )))?;
                }
                self.netlink
                    .replace_neighbour(device, gateway, vtep_mac)
                    .await
                    .map_err(netlink_error(format!(
                        "programming the neighbour of peer {subnet}"
                    )))?;
                self.netlink
                    .replace_fdb(device, vtep_mac, public_ip)
                    .await
                    .map_err(netlink_error(format!(
                        "programming the FDB entry of peer {subnet}"
                    )))?;
                self.routes
                    .replace(&self.vxlan_route(subnet, gateway), form)
                    .await
                    .map_err(netlink_error(format!(
                        "programming the route to peer {subnet}"
                    )))?;
            }
            Programmed::Direct { public_ip } => {
                // Replacing the route first moves traffic off the vxlan path before its
                // neighbour and FDB entry go.
                self.routes
                    .replace(&self.direct_route(subnet, public_ip), form)
                    .await
                    .map_err(netlink_error(format!(
                        "programming the direct route to peer {subnet} via {public_ip}"
                    )))?;
                if let Some(Programmed::Vxlan {
                    gateway,
                    vtep_mac,
                    public_ip,
                }) = previous
                {
                    self.remove_vxlan_entries(subnet, gateway, vtep_mac, public_ip)
                        .await?;
                }
            }
        }
        Ok(())
    }

    async fn remove_vxlan_entries(
        &self,
        subnet: Ipv4Network,
        gateway: Ipv4Addr,
        vtep_mac: MacAddr6,
        public_ip: Ipv4Addr,
    ) -> Result<(), DataplaneError> {
        self.netlink
            .delete_fdb(self.device_index, vtep_mac, Some(public_ip))
            .await
            .map_err(netlink_error(format!(
                "removing the FDB entry of peer {subnet}"
            )))?;
        self.netlink
            .delete_neighbour(self.device_index, gateway)
            .await
            .map_err(netlink_error(format!(
                "removing the neighbour of peer {subnet}"
            )))
    }

    /// Removes one peer, in the reverse order: route, FDB, neighbour.
    async fn unprogram(
        &self,
        subnet: Ipv4Network,
        programmed: Programmed,
    ) -> Result<(), DataplaneError> {
        let form = self.form_of(subnet);
        match programmed {
            Programmed::Vxlan {
                gateway,
                vtep_mac,
                public_ip,
            } => {
                self.routes
                    .delete(&self.vxlan_route(subnet, gateway), form)
                    .await
                    .map_err(netlink_error(format!(
                        "removing the route to peer {subnet}"
                    )))?;
                self.remove_vxlan_entries(subnet, gateway, vtep_mac, public_ip)
                    .await
            }
            Programmed::Direct { public_ip } => self
                .routes
                .delete(&self.direct_route(subnet, public_ip), form)
                .await
                .map_err(netlink_error(format!(
                    "removing the direct route to peer {subnet}"
                ))),
        }
    }

    async fn upsert(&mut self, peer: &Peer) -> Result<(), DataplaneError> {
        if let Some(lease) = &self.lease
            && peer.subnet == lease.subnet
        {
            debug!(subnet = %peer.subnet, "ignoring our own lease");
            return Ok(());
        }
        let programmed = self.desired(peer).await?;
        let previous = self.peers.get(&peer.subnet).copied();
        let form = match self.form_of(peer.subnet) {
            RouteForm::Interim => RouteForm::Interim,
            RouteForm::Final => self.form_for_new(usize::from(previous.is_none())),
        };
        self.program(peer.subnet, programmed, previous, form)
            .await?;
        if previous != Some(programmed) {
            info!(subnet = %peer.subnet, public_ip = %peer.public_ip, vtep_mac = ?peer.vtep_mac, direct = matches!(programmed, Programmed::Direct { .. }), "peer added");
        }
        self.peers.insert(peer.subnet, programmed);
        self.record_form(peer.subnet, form);
        Ok(())
    }

    async fn remove(&mut self, subnet: Ipv4Network) -> Result<(), DataplaneError> {
        let Some(programmed) = self.peers.get(&subnet).copied() else {
            debug!(%subnet, "removal of a peer we never programmed");
            return Ok(());
        };
        self.unprogram(subnet, programmed).await?;
        self.peers.remove(&subnet);
        self.record_form(subnet, RouteForm::Final);
        info!(%subnet, "peer removed");
        Ok(())
    }

    /// Mark-and-sweep: program every peer of the snapshot that is new or changed, then
    /// delete whatever this backend owns that is not in it. A peer programmed as the
    /// snapshot says is not written again (a re-list that changes nothing writes nothing;
    /// state someone deleted meanwhile is `maintain`'s job). The first snapshot also sweeps
    /// the kernel for leftovers: routes, neighbours and FDB entries on our device, and (with
    /// DirectRouting) direct routes into the cluster network on the uplink. Nothing else.
    /// Later sweeps belong to the full check: three dumps per re-list would cost ~60 ms at
    /// 20,000 peers, and a re-list cannot create leftovers (removed peers are diffed).
    async fn snapshot(&mut self, peers: &[Peer]) -> Result<(), DataplaneError> {
        let mut errors = Vec::new();
        // The first snapshot looks at the kernel before it writes: what a previous run left
        // exactly in place is kept, the rest of what it left is swept below.
        let before_first = if self.swept {
            None
        } else {
            self.dump().await.map_err(|err| errors.push(err)).ok()
        };
        let mut fresh = Vec::new();
        for peer in peers {
            if self
                .lease
                .as_ref()
                .is_some_and(|lease| lease.subnet == peer.subnet)
            {
                continue;
            }
            match self.desired(peer).await {
                Ok(programmed) => match self.peers.get(&peer.subnet) {
                    Some(previous) if *previous == programmed => {}
                    Some(_) => {
                        if let Err(err) = self.upsert(peer).await {
                            errors.push(err);
                        }
                    }
                    None => fresh.push((peer.subnet, programmed)),
                },
                Err(err) => errors.push(err),
            }
        }
        if let Some(state) = &before_first {
            fresh = self.adopt_held(state, fresh);
        }
        if !fresh.is_empty() {
            let count = fresh.len();
            errors.extend(self.program_batch(fresh).await);
            info!(peers = count, "peers programmed");
        }
        let gone = super::stale_subnets(self.peers.keys(), peers);
        for subnet in gone {
            if let Err(err) = self.remove(subnet).await {
                errors.push(err);
            }
        }
        if let Some(state) = before_first {
            // Taken before the writes above: everything they wrote is wanted, so what this
            // dump shows and no peer accounts for is exactly the leftovers.
            match self.sweep(&state).await {
                Ok(()) => self.swept = true,
                Err(err) => errors.push(err),
            }
        }
        combine_errors("resync", errors)
    }

    /// Programs many peers that hold nothing yet (first sync, a re-created device) with
    /// requests in flight together: per peer its neighbour and FDB entry, then (only when
    /// both succeeded) its route, flannel's rule that a route comes last. Neighbours and
    /// FDB entries go over sockets of their own, so the kernel works on them on both CPUs at
    /// once: neighbour updates do not take the RTNL lock that FDB and route updates share
    /// (10,000 of each kind with `ip -batch` here: 0.80 s one after the other, 0.54 s side
    /// by side). Routes have a third socket where the kernel has nexthop objects, else they
    /// share the FDB socket (see `new`). Records the peers that succeeded and returns the
    /// failures.
    async fn program_batch(
        &mut self,
        batch: Vec<(Ipv4Network, Programmed)>,
    ) -> Vec<DataplaneError> {
        let device = self.device_index;
        let form = self.form_for_new(batch.len());
        // Owned inputs and handle clones per request: futures that borrow trip the
        // compiler's Send check for the spawned dataplane task.
        let work: Vec<(Ipv4Network, Programmed, Route)> = batch
            .iter()
            .map(|(subnet, programmed)| (*subnet, *programmed, self.route_of(*subnet, *programmed)))
            .collect();
        let results: Vec<(Ipv4Network, Programmed, Result<(), DataplaneError>)> =
            stream::iter(work)
                .map(|(subnet, programmed, route)| {
                    let (neighbours, fdb, routes) =
                        (self.netlink.clone(), self.fdb.clone(), self.routes.clone());
                    async move {
                        if let Programmed::Vxlan {
                            gateway,
                            vtep_mac,
                            public_ip,
                        } = programmed
                        {
                            let (neighbour, entry) = futures_util::join!(
                                neighbours.replace_neighbour(device, gateway, vtep_mac),
                                fdb.replace_fdb(device, vtep_mac, public_ip)
                            );
                            let ready = neighbour
                                .map_err(netlink_error(format!(
                                    "programming the neighbour of peer {subnet}"
                                )))
                                .and(entry.map_err(netlink_error(format!(
                                    "programming the FDB entry of peer {subnet}"
                                ))));
                            if let Err(err) = ready {
                                return (subnet, programmed, Err(err));
                            }
                        }
                        let routed =
                            routes
                                .replace(&route, form)
                                .await
                                .map_err(netlink_error(format!(
                                    "programming the route to peer {subnet}"
                                )));
                        (subnet, programmed, routed)
                    }
                })
                .buffer_unordered(REQUESTS_IN_FLIGHT)
                .collect()
                .await;
        let mut errors = Vec::new();
        for (subnet, programmed, result) in results {
            match result {
                Ok(()) => {
                    debug!(%subnet, ?programmed, "peer added");
                    self.peers.insert(subnet, programmed);
                    self.record_form(subnet, form);
                }
                Err(err) => errors.push(err),
            }
        }
        if form == RouteForm::Interim {
            info!(
                routes = self.interim_routes.len(),
                "peer routes written through interim nexthop objects; rewriting them in flannel's form while idle"
            );
        }
        errors
    }

    /// Deletes kernel state on our device (and our direct routes) that no peer accounts for:
    /// left over from before a restart, or from a peer removed while we were down.
    async fn sweep(&self, state: &KernelState) -> Result<(), DataplaneError> {
        let device = self.device_index;
        let name = &self.settings.name;
        let mut errors = Vec::new();

        let mut gateways = HashSet::new();
        let mut fdb = HashSet::new();
        for programmed in self.peers.values() {
            if let Programmed::Vxlan {
                gateway,
                vtep_mac,
                public_ip,
            } = *programmed
            {
                gateways.insert(gateway);
                fdb.insert((vtep_mac, public_ip));
            }
        }
        self.sweep_routes(state, &mut errors).await;

        for neighbour in state
            .neighbours
            .iter()
            .filter(|n| n.permanent && !gateways.contains(&n.ip))
        {
            info!(device = %name, ip = %neighbour.ip, "removing stale neighbour");
            if let Err(err) = self.netlink.delete_neighbour(device, neighbour.ip).await {
                errors.push(netlink_error(format!(
                    "removing stale neighbour {}",
                    neighbour.ip
                ))(err));
            }
        }
        for entry in state.fdb.iter().filter(|e| {
            e.own && e.permanent && e.dst.is_none_or(|dst| !fdb.contains(&(e.mac, dst)))
        }) {
            info!(device = %name, mac = %entry.mac, dst = ?entry.dst, "removing stale FDB entry");
            if let Err(err) = self.netlink.delete_fdb(device, entry.mac, entry.dst).await {
                errors.push(netlink_error(format!(
                    "removing stale FDB entry {}",
                    entry.mac
                ))(err));
            }
        }
        self.sweep_nexthops(state, &mut errors).await;
        combine_errors("sweeping stale state", errors)
    }

    /// The routes part of [`Self::sweep`]: routes on our device that no peer accounts for,
    /// and (with DirectRouting) direct routes into the cluster network on the uplink.
    async fn sweep_routes(&self, state: &KernelState, errors: &mut Vec<DataplaneError>) {
        let device = self.device_index;
        let mut vxlan_routes = HashSet::new();
        let mut direct_routes = HashSet::new();
        for (subnet, programmed) in &self.peers {
            match programmed {
                Programmed::Vxlan { .. } => vxlan_routes.insert(*subnet),
                Programmed::Direct { .. } => direct_routes.insert(*subnet),
            };
        }
        for listed in &state.routes {
            let route = listed.route;
            let ours_on_device = route.oif == Some(device)
                && listed.protocol != rtnetlink::packet_route::route::RouteProtocol::Kernel
                && !vxlan_routes.contains(&route.destination);
            let stale_direct = self.direct_routing
                && route.oif == Some(self.uplink.index)
                && route.gateway.is_some()
                && listed.protocol == rtnetlink::packet_route::route::RouteProtocol::Boot
                && !direct_routes.contains(&route.destination)
                && self.lease.as_ref().is_some_and(|lease| {
                    lease.network.contains(route.destination.network())
                        && route.destination.prefix() >= lease.network.prefix()
                        && route.destination != lease.subnet
                });
            if ours_on_device || stale_direct {
                info!(route = %route, nhid = ?listed.nexthop_id, "removing stale route");
                let deleted = match listed.nexthop_id {
                    Some(id) => {
                        self.netlink
                            .delete_route_via_nexthop(route.destination, id)
                            .await
                    }
                    None => self.netlink.delete_route(&route).await,
                };
                if let Err(err) = deleted {
                    errors.push(netlink_error(format!("removing stale route {route}"))(err));
                }
            }
        }
    }

    /// Nexthop objects of ours that no peer uses: every one on our device, and (with
    /// DirectRouting) those on the uplink whose id is a subnet of the cluster network. The
    /// kernel removes the routes through one with it; ours were replaced already.
    async fn sweep_nexthops(&self, state: &KernelState, errors: &mut Vec<DataplaneError>) {
        let wanted: HashSet<u32> = match self.routes.nexthops {
            Some(_) => self.peers.keys().copied().map(nexthop_id).collect(),
            None => self
                .interim_routes
                .iter()
                .copied()
                .map(nexthop_id)
                .collect(),
        };
        let network = self.lease.as_ref().map(|lease| lease.network);
        let ours = |nexthop: &Nexthop| {
            nexthop.oif == self.device_index
                || (self.direct_routing
                    && nexthop.oif == self.uplink.index
                    && network.is_some_and(|n| n.contains(std::net::Ipv4Addr::from(nexthop.id))))
        };
        let stale: Vec<&Nexthop> = state
            .nexthops
            .iter()
            .filter(|nexthop| ours(nexthop) && !wanted.contains(&nexthop.id))
            .collect();
        if stale.is_empty() {
            return;
        }
        let deleted = match self.routes.any_nexthops() {
            Some(nexthops) => Ok(nexthops.clone()),
            None => Nexthops::connect(),
        };
        let nexthops = match deleted {
            Ok(nexthops) => nexthops,
            Err(err) => {
                errors.push(netlink_error("opening a nexthop socket")(err));
                return;
            }
        };
        for nexthop in stale {
            info!(%nexthop, "removing stale nexthop object");
            if let Err(err) = nexthops.delete(nexthop.id).await {
                errors.push(netlink_error(format!("removing stale nexthop {nexthop}"))(
                    err,
                ));
            }
        }
    }

    /// One dump of each kind this backend owns: routes, and our device's neighbours and FDB.
    async fn dump(&self) -> Result<KernelState, DataplaneError> {
        let device = self.device_index;
        let name = &self.settings.name;
        Ok(KernelState {
            routes: self
                .netlink
                .routes()
                .await
                .map_err(netlink_error("listing routes"))?,
            neighbours: self
                .netlink
                .neighbours(device)
                .await
                .map_err(netlink_error(format!("listing neighbours of {name}")))?,
            fdb: self
                .netlink
                .fdb_entries(device)
                .await
                .map_err(netlink_error(format!("listing FDB entries of {name}")))?,
            nexthops: self.dump_nexthops().await?,
        })
    }

    /// Our nexthop objects: with --nexthop-objects or interim routes every time (an interim
    /// object whose deletion failed is swept by the next full check); otherwise only until
    /// the first sweep (a kernel without nexthop objects then has none to list).
    async fn dump_nexthops(&self) -> Result<Vec<Nexthop>, DataplaneError> {
        let devices = [self.device_index, self.uplink.index];
        if let Some(nexthops) = self.routes.any_nexthops() {
            return nexthops
                .list(&devices)
                .await
                .map_err(netlink_error("listing nexthop objects"));
        }
        if self.swept {
            return Ok(Vec::new());
        }
        let listed = match Nexthops::connect() {
            Ok(nexthops) => nexthops.list(&devices).await,
            Err(err) => Err(err),
        };
        Ok(listed.unwrap_or_else(|err| {
            debug!(error = %err, "cannot list nexthop objects (none to sweep)");
            Vec::new()
        }))
    }

    /// Whether `held` shows all of a peer's state, its route in `form`.
    fn holds_peer(
        &self,
        held: &HeldState,
        subnet: Ipv4Network,
        programmed: Programmed,
        form: RouteForm,
    ) -> bool {
        let route = self.route_of(subnet, programmed);
        let routed = held
            .routes
            .get(&subnet)
            .is_some_and(|listed| self.routes.holds(listed, &route, form));
        routed
            && match programmed {
                Programmed::Vxlan {
                    gateway,
                    vtep_mac,
                    public_ip,
                } => {
                    held.neighbours.contains(&(gateway, Some(vtep_mac)))
                        && held.fdb.contains(&(vtep_mac, Some(public_ip)))
                }
                Programmed::Direct { .. } => true,
            }
    }

    /// Takes the peers of `fresh` that `state` shows exactly in place (a previous run
    /// programmed them; their route in flannel's form or an interim one) as programmed,
    /// without writing them again; returns the rest. A restart at 20,000 peers then writes
    /// nothing instead of replacing every route, each replace a scan of all the others.
    fn adopt_held(
        &mut self,
        state: &KernelState,
        fresh: Vec<(Ipv4Network, Programmed)>,
    ) -> Vec<(Ipv4Network, Programmed)> {
        let held = HeldState::of(state);
        // Interim routes are kept only where new ones would be written interim: in a small
        // cluster (e.g. after a run with --nexthop-objects) they are rewritten at once.
        let interim_possible = self.form_for_new(fresh.len()) == RouteForm::Interim;
        let mut left = Vec::new();
        let mut adopted = 0usize;
        for (subnet, programmed) in fresh {
            let form = if self.holds_peer(&held, subnet, programmed, RouteForm::Final) {
                RouteForm::Final
            } else if interim_possible
                && self.holds_peer(&held, subnet, programmed, RouteForm::Interim)
            {
                RouteForm::Interim
            } else {
                left.push((subnet, programmed));
                continue;
            };
            self.peers.insert(subnet, programmed);
            self.record_form(subnet, form);
            adopted += 1;
        }
        if adopted > 0 {
            info!(
                peers = adopted,
                "peers found in place (from before a restart); not written again"
            );
        }
        left
    }

    /// Re-programs every peer whose route, neighbour or FDB entry is missing from `state`
    /// (a hash lookup per peer).
    async fn restore_peers(&self, state: &KernelState) -> Result<(), DataplaneError> {
        let held = HeldState::of(state);
        let broken: Vec<Ipv4Network> = self
            .peers
            .iter()
            .filter(|(subnet, programmed)| {
                !self.holds_peer(&held, **subnet, **programmed, self.form_of(**subnet))
            })
            .map(|(subnet, _)| *subnet)
            .collect();
        self.reprogram(broken).await
    }

    /// Programs these peers again as we hold them (their state was found missing).
    async fn reprogram(&self, subnets: Vec<Ipv4Network>) -> Result<(), DataplaneError> {
        let mut errors = Vec::new();
        for subnet in subnets {
            let Some(programmed) = self.peers.get(&subnet).copied() else {
                continue;
            };
            warn!(%subnet, "state for peer was missing (deleted by someone?); restoring it");
            if let Err(err) = self
                .program(subnet, programmed, None, self.form_of(subnet))
                .await
            {
                errors.push(err);
            }
        }
        combine_errors("restoring peers", errors)
    }

    /// The peers whose subnet's network address is `ip` (an ordered-map range, not a scan).
    fn peers_at(&self, ip: Ipv4Addr) -> impl Iterator<Item = (Ipv4Network, &Programmed)> {
        let first = Ipv4Network::new(ip, 0).expect("prefix 0 is valid");
        let last = Ipv4Network::new(ip, 32).expect("prefix 32 is valid");
        self.peers
            .range(first..=last)
            .filter(move |(subnet, _)| subnet.network() == ip)
            .map(|(subnet, programmed)| (*subnet, programmed))
    }

    /// Looks at the notifications since the last call and repairs exactly what they say was
    /// deleted. A change on our device or the uplink, a lost notification, or no
    /// subscription at all means a full check.
    async fn apply_changes(&mut self) -> Result<(), DataplaneError> {
        let changes = self.changes.take();
        let mut full = !self.changes.live();
        let device = self.device_index;
        let uplink = self.uplink.index;
        let mut broken = BTreeSet::new();
        let mut deleted_fdb = HashSet::new();
        for change in changes {
            match change {
                KernelChange::LinkChanged { index } | KernelChange::LinkDeleted { index }
                    if index == device || index == uplink =>
                {
                    full = true
                }
                KernelChange::RouteDeleted(route)
                    if (route.oif == Some(device) || route.oif == Some(uplink))
                        && self.peers.contains_key(&route.destination) =>
                {
                    broken.insert(route.destination);
                }
                KernelChange::NeighbourDeleted { index, ip } if index == device => {
                    // A peer's gateway is its subnet's network address.
                    broken.extend(self.peers_at(ip).filter_map(|(subnet, programmed)| {
                        matches!(programmed, Programmed::Vxlan { gateway, .. } if *gateway == ip)
                            .then_some(subnet)
                    }));
                }
                KernelChange::FdbDeleted { index, mac, dst } if index == device => {
                    deleted_fdb.insert((mac, dst));
                }
                KernelChange::NexthopDeleted { id } if self.routes.nexthops.is_some() => {
                    // The kernel took the route through it without a word.
                    broken.extend(self.peers_at(Ipv4Addr::from(id)).map(|(subnet, _)| subnet));
                }
                KernelChange::Overrun => full = true,
                _ => {}
            }
        }
        if full {
            return self.maintain_fully().await;
        }
        if !deleted_fdb.is_empty() {
            broken.extend(
                self.peers
                    .iter()
                    .filter_map(|(subnet, programmed)| match programmed {
                        Programmed::Vxlan {
                            vtep_mac,
                            public_ip,
                            ..
                        } if deleted_fdb.contains(&(*vtep_mac, Some(*public_ip))) => Some(*subnet),
                        _ => None,
                    }),
            );
        }
        self.reprogram(broken.into_iter().collect()).await
    }

    /// The full check: the device, our address on it, and every peer's entries.
    async fn maintain_fully(&mut self) -> Result<(), DataplaneError> {
        // Everything is looked at now; earlier notifications add nothing.
        self.changes.take();
        let recreated = self.ensure_device(false).await?;
        if recreated {
            warn!(device = %self.settings.name, "vxlan device was missing or changed; re-created it with the same MAC, re-programming peers");
        }
        if let Some(lease) = self.lease.clone() {
            self.program_device(&lease).await?;
        }
        if recreated {
            // A new device holds nothing: program every peer, without looking.
            let batch: Vec<(Ipv4Network, Programmed)> =
                std::mem::take(&mut self.peers).into_iter().collect();
            return combine_errors("restoring peers", self.program_batch(batch).await);
        }
        let state = self.dump().await?;
        self.restore_peers(&state).await?;
        if self.swept {
            // Leftovers that appeared since (a stale route someone added on our device).
            self.sweep(&state).await?;
        }
        Ok(())
    }
}

impl super::Dataplane for VxlanDataplane {
    fn name(&self) -> &'static str {
        "vxlan"
    }

    async fn activate(&mut self, lease: &LocalLease) -> Result<(), DataplaneError> {
        if lease.public_ip != self.uplink.public_ip {
            warn!(lease = %lease.public_ip, uplink = %self.uplink.public_ip, "lease PublicIP differs from the uplink's public IP");
        }
        self.program_device(lease).await?;
        // A peer entry for our own subnet (e.g. from before a re-lease) must go.
        if let Some(programmed) = self.peers.remove(&lease.subnet) {
            self.unprogram(lease.subnet, programmed).await?;
            self.record_form(lease.subnet, RouteForm::Final);
        }
        self.lease = Some(lease.clone());
        Ok(())
    }

    async fn apply(&mut self, event: &PeerEvent) -> Result<(), DataplaneError> {
        match event {
            PeerEvent::Upsert(peer) => self.upsert(peer).await,
            PeerEvent::Remove(subnet) => self.remove(*subnet).await,
            PeerEvent::Snapshot(peers) => {
                let result = self.snapshot(peers).await;
                // Programmed (or failed, and retried by a full check): from now on the
                // kernel's notifications say what needs repair. Joining asks for that full
                // check, which also sees whatever changed during the sync.
                self.feed.join();
                result
            }
        }
    }

    async fn maintain(&mut self) -> Result<(), DataplaneError> {
        self.maintain_fully().await
    }

    async fn kernel_changed(&mut self) {
        self.changes.changed().await
    }

    fn change_feed(&self) -> ChangeFeed {
        self.feed.clone()
    }

    fn deferred_work_due(&self) -> Option<tokio::time::Instant> {
        (!self.interim_routes.is_empty()).then_some(self.rewrite_after)
    }

    async fn do_deferred_work(&mut self) -> Result<(), DataplaneError> {
        self.rewrite_interim_routes().await
    }

    async fn maintain_changes(&mut self) -> Result<(), DataplaneError> {
        if !self.feed.joined() && std::time::Instant::now() >= self.join_by {
            info!("no peer snapshot yet; following the kernel's change notifications anyway");
            self.feed.join();
        }
        self.apply_changes().await
    }
}

/// A random unicast, locally administered MAC (as flannel's VtepMAC).
pub fn random_vtep_mac() -> MacAddr6 {
    let mut bytes: [u8; 6] = rand::random();
    bytes[0] = (bytes[0] & 0xfe) | 0x02;
    MacAddr6::from(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vtep_mac_is_unicast_and_locally_administered() {
        for _ in 0..64 {
            let mac = random_vtep_mac();
            let first = mac.as_bytes()[0];
            assert_eq!(first & 0x01, 0, "multicast bit set in {mac}");
            assert_eq!(first & 0x02, 0x02, "not locally administered: {mac}");
        }
    }
}
