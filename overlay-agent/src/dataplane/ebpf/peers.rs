//! Remote peers in the maps: PEERS, PEER_SOURCES and the underlay next hops.

use super::*;

/// The notifications that can move a peer's underlay next hop: routes, links, and a loss.
pub(super) fn underlay_interest(change: &KernelChange) -> bool {
    matches!(
        change,
        KernelChange::RouteAdded(_)
            | KernelChange::RouteDeleted(_)
            | KernelChange::LinkChanged { .. }
            | KernelChange::LinkDeleted { .. }
            | KernelChange::Overrun
    )
}

impl<K: Dataplane> EbpfDataplane<K> {
    pub(super) fn peer_key(subnet: Ipv4Network) -> Key<PeerSubnet> {
        Key::new(u32::from(subnet.prefix()), subnet.network().octets())
    }

    /// Writes one peer (its source first, so its VXLAN is accepted before we send to it).
    /// The next hop is what was resolved for its address so far (zero: not yet, the fast
    /// path then lets the kernel route each packet).
    pub(super) fn write_peer(&mut self, peer: &Peer) -> Result<(), EbpfError> {
        let Some(mac) = peer.vtep_mac else {
            return Ok(());
        };
        self.write_source(peer.public_ip)?;
        let value = PeerInfo {
            underlay_ip: peer.public_ip.octets(),
            vtep_mac: mac.into_array(),
            flags: peer_flags::VALID,
            generation: self.generation,
            nexthop_ip: self
                .nexthops
                .get(&peer.public_ip)
                .and_then(|(hop, _)| *hop)
                .map_or([0; 4], |hop| hop.octets()),
        };
        self.maps
            .peers
            .insert(&Self::peer_key(peer.subnet), value, 0)
            .map_err(map_err(
                format!("adding peer {}", peer.subnet),
                map_names::PEERS,
            ))?;
        debug!(subnet = %peer.subnet, public_ip = %peer.public_ip, "peer written");
        Ok(())
    }

    /// Resolves (a bounded number of) peers' underlay next hops that are unknown or due for
    /// a re-check, and rewrites the peers whose next hop changed.
    pub(super) async fn resolve_nexthops(&mut self) -> Result<(), EbpfError> {
        let now = std::time::Instant::now();
        self.resolve_pending_nexthops(now).await?;
        if self.underlay_changed() {
            // Everything is due: looked up again now.
            let due = now.checked_sub(NEXTHOP_RECHECK * 2).unwrap_or(now);
            self.nexthops.values_mut().for_each(|(_, when)| *when = due);
            self.nexthop_scan_at = now;
        }
        if now < self.nexthop_scan_at {
            return Ok(());
        }
        self.nexthop_scan_at = now + NEXTHOP_SCAN_INTERVAL;
        let mut due: Vec<Ipv4Addr> = self
            .source_counts
            .keys()
            .filter(|ip| {
                self.nexthops.get(ip).is_none_or(|(hop, when)| {
                    let after = if hop.is_some() {
                        NEXTHOP_RECHECK
                    } else {
                        NEXTHOP_RETRY
                    };
                    now.duration_since(*when) > after
                })
            })
            .copied()
            .collect();
        due.sort_unstable();
        due.truncate(NEXTHOPS_PER_PASS);
        let mut changed = HashSet::new();
        let looked_up = self.look_up_nexthops(due).await;
        for (ip, hop) in looked_up {
            let previous = self.nexthops.insert(ip, (hop, now));
            if previous.and_then(|(old, _)| old) != hop {
                changed.insert(ip);
            }
        }
        let sources = &self.source_counts;
        self.nexthops.retain(|ip, _| sources.contains_key(ip));
        if changed.is_empty() {
            return Ok(());
        }
        let peers: Vec<Peer> = self
            .peers
            .values()
            .filter(|p| changed.contains(&p.public_ip))
            .cloned()
            .collect();
        for peer in peers {
            self.write_peer(&peer)?;
        }
        Ok(())
    }

    /// The next hops of peers added one by one since the last pass: looked up, and those
    /// peers written with them, at a cost that does not grow with the number of peers.
    async fn resolve_pending_nexthops(&mut self, now: std::time::Instant) -> Result<(), EbpfError> {
        if self.nexthop_pending.is_empty() {
            return Ok(());
        }
        let pending = std::mem::take(&mut self.nexthop_pending);
        let mut ips: Vec<Ipv4Addr> = pending
            .iter()
            .map(|(ip, _)| *ip)
            .filter(|ip| !self.nexthops.contains_key(ip))
            .collect();
        ips.sort_unstable();
        ips.dedup();
        for (ip, hop) in self.look_up_nexthops(ips).await {
            self.nexthops.insert(ip, (hop, now));
        }
        for (ip, subnet) in pending {
            if let Some(peer) = self
                .peers
                .get(&subnet)
                .filter(|p| p.public_ip == ip)
                .cloned()
                && self.nexthops.get(&ip).is_some_and(|(hop, _)| hop.is_some())
            {
                self.write_peer(&peer)?;
            }
        }
        Ok(())
    }

    /// Looks up the underlay next hop of each address, many lookups in flight: a first sync
    /// of 20,000 peers resolves in well under a second instead of trickling in over a
    /// minute of passes. None: no route yet.
    async fn look_up_nexthops(&self, ips: Vec<Ipv4Addr>) -> Vec<(Ipv4Addr, Option<Ipv4Addr>)> {
        futures_util::stream::iter(ips)
            .map(|ip| {
                let netlink = self.netlink.clone();
                async move {
                    match netlink.route_get(ip).await {
                        Ok(lookup) => (ip, Some(lookup.gateway.unwrap_or(ip))),
                        Err(err) => {
                            debug!(peer = %ip, error = %err, "no underlay route to a peer yet");
                            (ip, None)
                        }
                    }
                }
            })
            .buffer_unordered(LOOKUPS_IN_FLIGHT)
            .collect()
            .await
    }

    /// Whether a route outside the vxlan device or the uplink itself changed since the last
    /// call (a lost notification, or no notifications at all, counts as a change).
    pub(super) fn underlay_changed(&mut self) -> bool {
        let mut changed = !self.underlay_changes.live();
        for change in self.underlay_changes.take() {
            changed |= match change {
                KernelChange::RouteAdded(route) | KernelChange::RouteDeleted(route) => {
                    route.oif.is_none() || route.oif != self.vxlan_ifindex
                }
                KernelChange::LinkChanged { index } | KernelChange::LinkDeleted { index } => {
                    index == self.settings.uplink.index
                }
                KernelChange::Overrun => true,
                _ => false,
            };
        }
        changed
    }

    /// How many desired peers use `ip` as their underlay address.
    pub(super) fn source_count(&self, ip: Ipv4Addr) -> u32 {
        self.source_counts.get(&ip).copied().unwrap_or(0)
    }

    /// Counts `peer` in (`add`) or out of the users of its underlay address.
    pub(super) fn count_source(&mut self, peer: &Peer, add: bool) {
        if peer.vtep_mac.is_none() {
            return;
        }
        let count = self.source_counts.entry(peer.public_ip).or_insert(0);
        if add {
            *count += 1;
        } else {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.source_counts.remove(&peer.public_ip);
            }
        }
    }

    /// Writes (count > 0) or deletes (count == 0) the PEER_SOURCES entry of `ip`.
    pub(super) fn write_source(&mut self, ip: Ipv4Addr) -> Result<(), EbpfError> {
        let count = self.source_count(ip);
        if count == 0 {
            match absent_ok(self.maps.sources.remove(&ip.octets())) {
                Ok(()) => Ok(()),
                Err(source) => Err(EbpfError::Map {
                    what: format!("removing peer source {ip}"),
                    map: map_names::PEER_SOURCES,
                    source: Box::new(source),
                }),
            }
        } else {
            let value = PeerSource {
                lease_count: count,
                generation: self.generation,
            };
            self.maps
                .sources
                .insert(ip.octets(), value, 0)
                .map_err(map_err(
                    format!("adding peer source {ip}"),
                    map_names::PEER_SOURCES,
                ))
        }
    }

    pub(super) fn remove_peer_entry(&mut self, subnet: Ipv4Network) -> Result<(), EbpfError> {
        match absent_ok(self.maps.peers.remove(&Self::peer_key(subnet))) {
            Ok(()) => Ok(()),
            Err(source) => Err(EbpfError::Map {
                what: format!("removing peer {subnet}"),
                map: map_names::PEERS,
                source: Box::new(source),
            }),
        }
    }

    pub(super) fn upsert(&mut self, peer: &Peer) -> Result<(), EbpfError> {
        let previous = self.peers.insert(peer.subnet, peer.clone());
        if !self.nexthops.contains_key(&peer.public_ip) {
            // Looked up on its own next: a scan of every peer's next hop per new peer cost
            // milliseconds at 20,000 peers, and every lease change waited behind it.
            self.nexthop_pending.push((peer.public_ip, peer.subnet));
        }
        if let Some(previous) = &previous {
            self.count_source(previous, false);
        }
        self.count_source(peer, true);
        if peer.vtep_mac.is_none() {
            // Not a vxlan lease: the kernel dataplane handles it.
            self.remove_peer_entry(peer.subnet)?;
        } else {
            self.write_peer(peer)?;
        }
        if let Some(previous) = previous.filter(|p| p.public_ip != peer.public_ip) {
            self.write_source(previous.public_ip)?;
        }
        Ok(())
    }

    pub(super) fn remove(&mut self, subnet: Ipv4Network) -> Result<(), EbpfError> {
        let previous = self.peers.remove(&subnet);
        // Stop sending first, then stop accepting.
        self.remove_peer_entry(subnet)?;
        if let Some(previous) = previous {
            self.count_source(&previous, false);
            self.write_source(previous.public_ip)?;
        }
        Ok(())
    }

    /// Brings the maps to the snapshot: writes the peers that are new or changed, removes
    /// the ones it no longer lists, and rewrites the sources whose count changed. A re-list
    /// that changes nothing writes nothing. The first snapshot after start sweeps whatever
    /// the maps hold that is not in it (a previous run's entries), then writes every peer.
    pub(super) fn snapshot(&mut self, peers: &[Peer]) -> Result<(), EbpfError> {
        let previous = std::mem::take(&mut self.peers);
        let previous_counts = std::mem::take(&mut self.source_counts);
        self.peers = peers.iter().map(|p| (p.subnet, p.clone())).collect();
        for peer in peers {
            self.count_source(peer, true);
        }
        let first = !self.synced;
        if first {
            // Before writing: the maps then hold only what a previous run left, so a start
            // on fresh maps looks at nothing instead of every entry just written.
            self.sweep_peer_maps()?;
        }
        if peers
            .iter()
            .any(|p| !self.nexthops.contains_key(&p.public_ip))
        {
            self.nexthop_scan_at = std::time::Instant::now();
        }
        for peer in peers {
            if !first && previous.get(&peer.subnet) == Some(peer) {
                continue;
            }
            if peer.vtep_mac.is_none() {
                self.remove_peer_entry(peer.subnet)?;
            } else {
                self.write_peer(peer)?;
            }
        }
        let gone: Vec<Ipv4Network> = previous
            .keys()
            .filter(|s| !self.peers.contains_key(*s))
            .copied()
            .collect();
        for subnet in gone {
            self.remove_peer_entry(subnet)?;
        }
        let recount: Vec<Ipv4Addr> = previous_counts
            .iter()
            .filter(|(ip, count)| self.source_counts.get(*ip) != Some(*count))
            .map(|(ip, _)| *ip)
            .collect();
        for ip in recount {
            self.write_source(ip)?;
        }
        if first {
            self.synced = true;
            info!(peers = peers.len(), "peer maps written");
        }
        Ok(())
    }

    /// Deletes PEERS and PEER_SOURCES entries no desired peer accounts for.
    pub(super) fn sweep_peer_maps(&mut self) -> Result<(), EbpfError> {
        let stale_peers: Vec<Key<PeerSubnet>> = self
            .maps
            .peers
            .keys()
            .filter_map(Result::ok)
            .filter(|key| {
                let subnet = Ipv4Network::new(Ipv4Addr::from(key.data()), key.prefix_len() as u8);
                subnet.map_or(true, |subnet| {
                    self.peers.get(&subnet).is_none_or(|p| p.vtep_mac.is_none())
                })
            })
            .collect();
        for key in stale_peers {
            debug!(subnet = ?Ipv4Addr::from(key.data()), prefix = key.prefix_len(), "sweeping stale peer");
            absent_ok(self.maps.peers.remove(&key))
                .map_err(map_err("sweeping a stale peer", map_names::PEERS))?;
        }
        let stale_sources: Vec<[u8; 4]> = self
            .maps
            .sources
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !self.source_counts.contains_key(&Ipv4Addr::from(*k)))
            .collect();
        for key in stale_sources {
            debug!(source = %Ipv4Addr::from(key), "sweeping stale peer source");
            absent_ok(self.maps.sources.remove(&key)).map_err(map_err(
                "sweeping a stale peer source",
                map_names::PEER_SOURCES,
            ))?;
        }
        Ok(())
    }
}
