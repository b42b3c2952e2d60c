//! Subnet leases in etcd, in flannel's format and order.
//!
//! A lease is the key `<prefix>/subnets/A.B.C.D-N` whose value is flannel's JSON
//! (`{"PublicIP":..,"PublicIPv6":null,"BackendType":..,"BackendData":..}`), attached to an
//! etcd lease with a 24 h TTL. Acquisition order (flannel's): (1) a lease that already
//! holds our PublicIP and still fits the config (one that does not fit is deleted);
//! (2) the subnet of the previous subnet file if free and fitting; (3) a random one among up
//! to 100 free subnets. Creation is a transaction "only if the key does not exist"; unlike
//! flanneld, losing that race retries with another subnet instead of exiting.

use std::{
    collections::HashSet,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use ipnetwork::Ipv4Network;
use rand::seq::IndexedRandom;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::{
    control::config::NetworkConfig,
    control::etcd::{EtcdError, EtcdOptions},
    control::store::{EventKind, Kv, KvStore, KvWatch, WatchBatch},
    dataplane::LeaseAttrs,
    peer::{LeaseBackend, MacAddr6, Peer},
};

/// flannel's lease lifetime.
pub const LEASE_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// flannel considers at most this many free subnets when picking one at random.
const RANDOM_CANDIDATES: usize = 100;
/// Rounds of list-and-try before giving up (each lost race costs one).
const MAX_ACQUIRE_ROUNDS: usize = 50;

/// Errors of lease handling. Each names the subnet or key concerned.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error(
        "out of subnets: all {total} subnets of {network} between SubnetMin {min} and SubnetMax {max} are leased. \
         Leases of dead nodes last 24 h: list them with `overlay-agent leases` and free one with \
         `overlay-agent lease release <subnet>` (or --public-ip <ip>), or widen Network/SubnetMin/SubnetMax in the config"
    )]
    OutOfSubnets {
        network: Ipv4Network,
        min: Ipv4Addr,
        max: Ipv4Addr,
        total: u64,
    },
    #[error(
        "gave up acquiring a subnet after losing {rounds} races with other nodes; retrying later"
    )]
    TooManyRaces { rounds: usize },
    #[error("{what:?} is not a subnet: write it as 10.5.52.0/24 (or the key form 10.5.52.0-24)")]
    BadSubnet { what: String },
}

/// Why a lease value could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct LeaseParseError(pub String);

/// A lease value as flannel writes it, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseValue {
    pub public_ip: Ipv4Addr,
    /// `BackendType` as written ("vxlan", "host-gw", "udp", ...).
    pub backend_type: String,
    /// `BackendData.VtepMAC` (vxlan).
    pub vtep_mac: Option<MacAddr6>,
    /// `BackendData.VNI` (vxlan).
    pub vni: Option<u32>,
}

impl LeaseValue {
    /// The peer this lease describes, if it is of the backend we speak; `Err` when it is of
    /// our backend but unusable (a vxlan lease without a VtepMAC).
    pub fn to_peer(
        &self,
        subnet: Ipv4Network,
        want: LeaseBackend,
    ) -> Result<Option<Peer>, LeaseParseError> {
        if !self
            .backend_type
            .eq_ignore_ascii_case(want.as_flannel_str())
        {
            return Ok(None);
        }
        if want == LeaseBackend::Vxlan && self.vtep_mac.is_none() {
            return Err(LeaseParseError(
                "vxlan lease without BackendData.VtepMAC".into(),
            ));
        }
        Ok(Some(Peer {
            subnet,
            public_ip: self.public_ip,
            vtep_mac: self.vtep_mac,
        }))
    }
}

#[derive(Serialize)]
struct LeaseJson<'a> {
    #[serde(rename = "PublicIP")]
    public_ip: String,
    #[serde(rename = "PublicIPv6")]
    public_ipv6: Option<String>,
    #[serde(rename = "BackendType")]
    backend_type: &'a str,
    #[serde(rename = "BackendData", skip_serializing_if = "Option::is_none")]
    backend_data: Option<VxlanData>,
}

#[derive(Serialize)]
struct VxlanData {
    #[serde(rename = "VNI")]
    vni: u32,
    #[serde(rename = "VtepMAC")]
    vtep_mac: String,
}

/// Go's net.HardwareAddr spelling: lower-case, colon separated.
pub fn format_mac(mac: &MacAddr6) -> String {
    let b = mac.as_bytes();
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        b[0], b[1], b[2], b[3], b[4], b[5]
    )
}

/// The lease value exactly as flanneld writes it (field order included).
pub fn encode_lease(public_ip: Ipv4Addr, attrs: &LeaseAttrs) -> String {
    let (backend_type, backend_data) = match attrs {
        LeaseAttrs::Vxlan { vni, vtep_mac } => (
            "vxlan",
            Some(VxlanData {
                vni: *vni,
                vtep_mac: format_mac(vtep_mac),
            }),
        ),
        LeaseAttrs::HostGw => ("host-gw", None),
    };
    serde_json::to_string(&LeaseJson {
        public_ip: public_ip.to_string(),
        public_ipv6: None,
        backend_type,
        backend_data,
    })
    .expect("plain strings and numbers serialize")
}

fn get_ci<'a>(obj: &'a serde_json::Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(key))
        .map(|(_, v)| v)
        .filter(|v| !v.is_null())
}

/// Reads a lease value (keys case-insensitive, as Go's encoding/json reads them).
pub fn decode_lease(value: &[u8]) -> Result<LeaseValue, LeaseParseError> {
    let v: Value =
        serde_json::from_slice(value).map_err(|e| LeaseParseError(format!("not JSON: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| LeaseParseError("not a JSON object".into()))?;
    let public_ip = match get_ci(obj, "PublicIP") {
        None => return Err(LeaseParseError("no PublicIP".into())),
        Some(Value::String(s)) => s
            .parse::<Ipv4Addr>()
            .map_err(|e| LeaseParseError(format!("bad PublicIP {s:?}: {e}")))?,
        Some(other) => {
            return Err(LeaseParseError(format!(
                "PublicIP must be a string like \"192.168.1.2\", not {other}"
            )));
        }
    };
    let backend_type = match get_ci(obj, "BackendType") {
        None => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(LeaseParseError("BackendType is not a string".into())),
    };
    let (mut vtep_mac, mut vni) = (None, None);
    if let Some(data) = get_ci(obj, "BackendData") {
        let data = data
            .as_object()
            .ok_or_else(|| LeaseParseError("BackendData is not an object".into()))?;
        if let Some(mac) = get_ci(data, "VtepMAC") {
            let mac = mac
                .as_str()
                .ok_or_else(|| LeaseParseError("VtepMAC is not a string".into()))?;
            vtep_mac = Some(
                mac.parse::<MacAddr6>()
                    .map_err(|e| LeaseParseError(format!("bad VtepMAC {mac:?}: {e}")))?,
            );
        }
        if let Some(n) = get_ci(data, "VNI") {
            vni = Some(
                n.as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| LeaseParseError("VNI is not a number".into()))?,
            );
        }
    }
    Ok(LeaseValue {
        public_ip,
        backend_type,
        vtep_mac,
        vni,
    })
}

/// `10.5.52.0/24` -> `10.5.52.0-24`.
pub fn subnet_key_name(subnet: Ipv4Network) -> String {
    format!("{}-{}", subnet.ip(), subnet.prefix())
}

/// `<prefix>/subnets/10.5.52.0-24`.
pub fn subnet_key(opts: &EtcdOptions, subnet: Ipv4Network) -> String {
    format!("{}{}", opts.subnets_prefix(), subnet_key_name(subnet))
}

/// The subnet named by a key's last component (`10.5.52.0-24`); `None` for anything else,
/// including IPv6 (`10.5.52.0-24&fd00::-64`) or unaligned names.
pub fn parse_subnet_key_name(name: &str) -> Option<Ipv4Network> {
    let (ip, len) = name.split_once('-')?;
    let ip: Ipv4Addr = ip.parse().ok()?;
    let len: u8 = len.parse().ok()?;
    let net = Ipv4Network::new(ip, len).ok()?;
    (net.network() == ip).then_some(net)
}

/// Parses `10.5.52.0/24` or `10.5.52.0-24`.
pub fn parse_subnet_arg(s: &str) -> Result<Ipv4Network, LeaseError> {
    let bad = || LeaseError::BadSubnet {
        what: s.to_string(),
    };
    let s = s.trim();
    let net = if s.contains('/') {
        s.parse::<Ipv4Network>().map_err(|_| bad())?
    } else {
        parse_subnet_key_name(s).ok_or_else(bad)?
    };
    if net.network() != net.ip() {
        return Err(bad());
    }
    Ok(net)
}

/// One key under `<prefix>/subnets/`.
#[derive(Clone, Debug)]
pub struct ListedLease {
    pub key: String,
    /// `None` when the key's name is not a subnet.
    pub subnet: Option<Ipv4Network>,
    pub value: Result<LeaseValue, LeaseParseError>,
    /// The etcd lease the key is attached to (0 = none, and always in etcd v2).
    pub etcd_lease: i64,
    pub mod_revision: i64,
    /// The key as read (for compare-and-set and its TTL).
    pub kv: Kv,
}

/// Every lease under `<prefix>/subnets/` as read at one revision.
#[derive(Clone, Debug)]
pub struct LeaseListing {
    pub leases: Vec<ListedLease>,
    pub revision: i64,
}

/// Lists `<prefix>/subnets/`; returns the leases and the revision of the read.
pub async fn list_leases<S: KvStore>(
    client: &mut S,
    opts: &EtcdOptions,
) -> Result<(Vec<ListedLease>, i64), EtcdError> {
    let prefix = opts.subnets_prefix();
    let (kvs, revision) = client.list(&prefix).await?;
    let leases = kvs
        .into_iter()
        .map(|kv| {
            let name = kv.key.strip_prefix(&prefix).unwrap_or(&kv.key);
            ListedLease {
                subnet: parse_subnet_key_name(name),
                value: decode_lease(&kv.value),
                etcd_lease: kv.lease,
                mod_revision: kv.mod_revision,
                key: kv.key.clone(),
                kv,
            }
        })
        .collect();
    Ok((leases, revision))
}

/// Deletes a lease key (and revokes its v3 etcd lease). Returns whether it existed.
pub async fn release<S: KvStore>(
    client: &mut S,
    opts: &EtcdOptions,
    subnet: Ipv4Network,
) -> Result<bool, EtcdError> {
    client.delete(&subnet_key(opts, subnet)).await
}

/// Deletes every lease holding `public_ip`. Returns the subnets released.
pub async fn release_by_public_ip<S: KvStore>(
    client: &mut S,
    opts: &EtcdOptions,
    public_ip: Ipv4Addr,
) -> Result<Vec<Ipv4Network>, EtcdError> {
    let (leases, _) = list_leases(client, opts).await?;
    let mut released = Vec::new();
    for lease in leases {
        if let (Some(subnet), Ok(value)) = (lease.subnet, &lease.value)
            && value.public_ip == public_ip
            && release(client, opts, subnet).await?
        {
            released.push(subnet);
        }
    }
    Ok(released)
}

/// The lease this node holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldLease {
    pub subnet: Ipv4Network,
    /// The etcd lease id the key is attached to (v3; 0 in v2, where the key has the TTL).
    pub etcd_lease: i64,
    /// When the etcd lease was last granted or renewed, and for how long.
    pub renewed_at: Instant,
    pub ttl: Duration,
}

/// Acquires and keeps this node's subnet lease.
#[derive(Clone)]
pub struct Lessor<S = crate::control::store::Store> {
    client: S,
    opts: EtcdOptions,
    config: NetworkConfig,
    public_ip: Ipv4Addr,
    attrs: LeaseAttrs,
    ttl: Duration,
    /// The listing the last successful [`Lessor::acquire`] chose from (see
    /// [`Lessor::take_listing`]).
    listing: Option<LeaseListing>,
}

impl<S: KvStore> Lessor<S> {
    pub fn new(
        client: S,
        opts: EtcdOptions,
        config: NetworkConfig,
        public_ip: Ipv4Addr,
        attrs: LeaseAttrs,
    ) -> Lessor<S> {
        Lessor {
            client,
            opts,
            config,
            public_ip,
            attrs,
            ttl: LEASE_TTL,
            listing: None,
        }
    }

    /// The listing the last acquisition chose its subnet from, once: the peer watcher's
    /// first snapshot, watched from its revision on (our own key's creation comes after
    /// it), so a node does not read every lease twice on start.
    pub fn take_listing(&mut self) -> Option<LeaseListing> {
        self.listing.take()
    }

    /// A shorter TTL (tests).
    pub fn with_ttl(mut self, ttl: Duration) -> Lessor<S> {
        self.ttl = ttl;
        self
    }

    fn value(&self) -> String {
        encode_lease(self.public_ip, &self.attrs)
    }

    /// Creates `subnet`'s key only if it does not exist. `Ok(None)` when someone has it.
    async fn try_create(&mut self, subnet: Ipv4Network) -> Result<Option<HeldLease>, EtcdError> {
        let key = subnet_key(&self.opts, subnet);
        let value = self.value();
        Ok(self
            .client
            .create(&key, &value, self.ttl)
            .await?
            .map(|etcd_lease| self.held(subnet, etcd_lease)))
    }

    /// `subnet` held under `etcd_lease` from now on, for our TTL.
    fn held(&self, subnet: Ipv4Network, etcd_lease: i64) -> HeldLease {
        HeldLease {
            subnet,
            etcd_lease,
            renewed_at: Instant::now(),
            ttl: self.ttl,
        }
    }

    /// Rewrites an existing key of ours (found by PublicIP) with our current attributes and
    /// a fresh TTL, only if nobody changed it since we read it.
    async fn try_reuse(&mut self, listed: &ListedLease) -> Result<Option<HeldLease>, EtcdError> {
        let subnet = listed.subnet.expect("only called for subnet keys");
        let value = self.value();
        Ok(self
            .client
            .replace(&listed.kv, &value, self.ttl)
            .await?
            .map(|etcd_lease| self.held(subnet, etcd_lease)))
    }

    /// Acquires a subnet in flannel's order; `previous` is the subnet of the subnet file
    /// from the last run, if any.
    pub async fn acquire(
        &mut self,
        previous: Option<Ipv4Network>,
    ) -> Result<HeldLease, LeaseError> {
        let mut previous = previous.filter(|p| {
            let fits = self.config.fits(*p);
            if !fits {
                info!(subnet = %p, "the previous subnet file's subnet does not fit the current config; not reusing it");
            }
            fits
        });
        for _round in 0..MAX_ACQUIRE_ROUNDS {
            let (leases, revision) = list_leases(&mut self.client, &self.opts).await?;

            // (1) A lease that already carries our PublicIP.
            match self.reuse_own(&leases).await? {
                Reuse::Held(held) => return Ok(self.chosen_from(held, leases, revision)),
                Reuse::Retry => continue,
                Reuse::NotFound => {}
            }

            // Any key that names a subnet occupies it, even with a value we cannot read.
            let taken: HashSet<Ipv4Network> = leases.iter().filter_map(|l| l.subnet).collect();

            // (2) The previous run's subnet.
            if let Some(prev) = previous.take() {
                if !taken.contains(&prev)
                    && let Some(held) = self.try_create(prev).await?
                {
                    info!(subnet = %prev, "reacquired the subnet from the previous subnet file");
                    return Ok(self.chosen_from(held, leases, revision));
                }
                info!(subnet = %prev, "the previous subnet file's subnet is taken by another node; picking another");
            }

            // (3) Random among up to 100 free subnets.
            let free: Vec<Ipv4Network> = self
                .config
                .subnets()
                .filter(|s| !taken.contains(s))
                .take(RANDOM_CANDIDATES)
                .collect();
            let Some(choice) = free.choose(&mut rand::rng()).copied() else {
                return Err(LeaseError::OutOfSubnets {
                    network: self.config.network,
                    min: self.config.subnet_min,
                    max: self.config.subnet_max,
                    total: self.config.subnet_count(),
                });
            };
            if let Some(held) = self.try_create(choice).await? {
                info!(subnet = %choice, public_ip = %self.public_ip, "acquired a new subnet lease");
                return Ok(self.chosen_from(held, leases, revision));
            }
            debug!(subnet = %choice, "another node created this subnet first; trying another");
        }
        Err(LeaseError::TooManyRaces {
            rounds: MAX_ACQUIRE_ROUNDS,
        })
    }

    /// Keeps the listing `held` was chosen from for [`Lessor::take_listing`].
    fn chosen_from(
        &mut self,
        held: HeldLease,
        leases: Vec<ListedLease>,
        revision: i64,
    ) -> HeldLease {
        self.listing = Some(LeaseListing { leases, revision });
        held
    }

    /// flannel's first choice: a listed lease that already carries our PublicIP, if it still
    /// fits the config (one that does not is deleted).
    async fn reuse_own(&mut self, leases: &[ListedLease]) -> Result<Reuse, LeaseError> {
        for listed in leases {
            let (Some(subnet), Ok(value)) = (listed.subnet, &listed.value) else {
                continue;
            };
            if value.public_ip != self.public_ip {
                continue;
            }
            if !self.config.fits(subnet) {
                info!(subnet = %subnet, key = %listed.key, "deleting our old lease: it no longer fits the network config");
                self.client.delete_unchanged(&listed.kv).await?;
                continue;
            }
            return Ok(match self.try_reuse(listed).await? {
                Some(held) => {
                    info!(subnet = %subnet, public_ip = %self.public_ip, "reusing the lease that already holds our PublicIP");
                    Reuse::Held(held)
                }
                // It changed under us: list again.
                None => Reuse::Retry,
            });
        }
        Ok(Reuse::NotFound)
    }

    /// After our key vanished: take the same subnet back if it is still free, else acquire
    /// anew (flannel's order).
    pub async fn reclaim(&mut self, lost: Ipv4Network) -> Result<HeldLease, LeaseError> {
        if self.config.fits(lost)
            && let Some(held) = self.try_create(lost).await?
        {
            return Ok(held);
        }
        self.acquire(None).await
    }

    /// Refreshes the etcd lease to its full TTL. `Ok(false)` when the lease no longer exists.
    pub async fn renew(&mut self, held: &mut HeldLease) -> Result<bool, EtcdError> {
        let key = subnet_key(&self.opts, held.subnet);
        let value = self.value();
        match self
            .client
            .renew(&key, &value, held.etcd_lease, self.ttl)
            .await?
        {
            Some(ttl) => {
                held.renewed_at = Instant::now();
                held.ttl = ttl;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Whether our key still exists, holds our PublicIP and hangs on our etcd lease.
    /// Writes our value back on our key, attached to our still-live etcd lease.
    async fn restore(&mut self, held: &HeldLease) -> Result<(), EtcdError> {
        let key = subnet_key(&self.opts, held.subnet);
        let value = self.value();
        let left = held.ttl.saturating_sub(held.renewed_at.elapsed());
        self.client
            .rewrite(&key, &value, held.etcd_lease, left)
            .await
    }

    pub async fn still_ours(&mut self, held: &HeldLease) -> Result<bool, EtcdError> {
        let key = subnet_key(&self.opts, held.subnet);
        let (kv, _) = self.client.get(&key).await?;
        Ok(self.is_ours(kv.as_ref(), held))
    }

    fn is_ours(&self, kv: Option<&Kv>, held: &HeldLease) -> bool {
        kv.is_some_and(|kv| {
            kv.lease == held.etcd_lease
                && decode_lease(&kv.value).is_ok_and(|v| v.public_ip == self.public_ip)
        })
    }

    /// Keeps the lease: renews it `renew_margin` before it expires, and re-acquires it
    /// (the same subnet when still free) when our key is deleted or expires. Each new
    /// lease is published on `held_tx`. Runs until `held_tx` has no receivers.
    pub async fn keep(
        mut self,
        mut held: HeldLease,
        renew_margin: Duration,
        held_tx: watch::Sender<HeldLease>,
    ) {
        let mut backoff = Duration::from_secs(1);
        loop {
            if held_tx.is_closed() {
                return;
            }
            let Some((stream, ours)) = self.check_and_watch(&held, &mut backoff).await else {
                continue;
            };
            backoff = Duration::from_secs(1);
            let overwritten_by = if ours {
                match self
                    .hold(&mut held, stream, renew_margin, &mut backoff, &held_tx)
                    .await
                {
                    Held::Recheck => continue,
                    Held::Closed => return,
                    Held::Lost { overwritten_by } => overwritten_by,
                }
            } else {
                None
            };
            let key = subnet_key(&self.opts, held.subnet);
            if let Some(claimed) = overwritten_by {
                // Another writer put a lease with another PublicIP on our key. Moving to a new
                // subnet would cut off every pod of this node; the key is ours (our etcd lease
                // still lives), so we write our value back and say who tried to take it.
                warn!(key = %key, claimed_public_ip = %claimed, our_public_ip = %self.public_ip,
                    "another writer put a lease for our subnet with another PublicIP; writing ours back \
                     (two nodes cannot share a subnet: check the other node's --public-ip or remove its key)");
                match self.restore(&held).await {
                    Ok(()) => continue,
                    Err(err) => {
                        warn!(key = %key, error = %err, "cannot write our lease back; re-acquiring")
                    }
                }
            }
            let Some(new) = self.reacquire(held.subnet, &mut backoff, &held_tx).await else {
                return;
            };
            // The watcher lists again itself when our subnet changes: do not keep this one.
            self.listing = None;
            held = new;
            held_tx.send_replace(held.clone());
            backoff = Duration::from_secs(1);
        }
    }

    /// Reads our key and watches it from that revision on (so nothing between the two is
    /// missed); returns the watch (None: it could not start, we check at renewal) and
    /// whether the key still holds our lease. None when etcd could not be read (after a
    /// backoff and, with several endpoints, a reconnect).
    async fn check_and_watch(
        &mut self,
        held: &HeldLease,
        backoff: &mut Duration,
    ) -> Option<(Option<S::Watch>, bool)> {
        let key = subnet_key(&self.opts, held.subnet);
        let checked = self.client.get(&key).await;
        let stream = match &checked {
            Ok((_, revision)) => match self.client.watch(&key, false, revision + 1).await {
                Ok(stream) => Some(stream),
                Err(err) => {
                    warn!(key = %key, error = %err, "cannot watch our lease key; checking it periodically");
                    None
                }
            },
            Err(_) => None,
        };
        match checked {
            // The key may have vanished before the watch started.
            Ok((kv, _)) => Some((stream, self.is_ours(kv.as_ref(), held))),
            Err(err) => {
                warn!(error = %err, "cannot check our lease; retrying");
                tokio::time::sleep(*backoff).await;
                *backoff = (*backoff * 2).min(Duration::from_secs(30));
                // Probe the endpoints again: the one we used may be the one that died.
                if self.opts.endpoints.len() > 1
                    && let Ok(client) = self.client.reconnect(&self.opts).await
                {
                    self.client = client;
                }
                None
            }
        }
    }

    /// Renews the lease on time and follows our key's watch until the lease is lost, the
    /// watch breaks (check again) or nobody listens any more.
    async fn hold(
        &mut self,
        held: &mut HeldLease,
        mut stream: Option<S::Watch>,
        renew_margin: Duration,
        backoff: &mut Duration,
        held_tx: &watch::Sender<HeldLease>,
    ) -> Held {
        let mut overwritten_by = None;
        loop {
            let renew_in = renew_delay(held, renew_margin);
            tokio::select! {
                _ = tokio::time::sleep(renew_in) => match self.renew(held).await {
                    Ok(true) => debug!(subnet = %held.subnet, ttl = ?held.ttl, "lease renewed"),
                    Ok(false) => {
                        warn!(subnet = %held.subnet, "our etcd lease expired before renewal");
                        return Held::Lost { overwritten_by };
                    }
                    Err(err) => {
                        warn!(subnet = %held.subnet, error = %err, "renewing our lease failed; retrying");
                        tokio::time::sleep(*backoff).await;
                        *backoff = (*backoff * 2).min(Duration::from_secs(30));
                    }
                },
                msg = next_watch_message(&mut stream) => {
                    // None: the watch broke (etcd restart, compaction): re-establish, re-check.
                    let Some(events) = msg else { return Held::Recheck };
                    let mut lost = false;
                    for ev in events {
                        lost |= self.loses_lease(&ev, held, &mut overwritten_by);
                    }
                    if lost {
                        return Held::Lost { overwritten_by };
                    }
                }
                _ = held_tx.closed() => return Held::Closed,
            }
        }
    }

    /// Whether an event on our key means the lease is no longer ours; notes who wrote
    /// another PublicIP on it.
    fn loses_lease(
        &self,
        ev: &crate::control::store::KvEvent,
        held: &HeldLease,
        overwritten_by: &mut Option<Ipv4Addr>,
    ) -> bool {
        match ev.kind {
            EventKind::Delete => true,
            EventKind::Put => {
                let value = decode_lease(&ev.kv.value);
                if let Ok(v) = &value
                    && v.public_ip != self.public_ip
                {
                    *overwritten_by = Some(v.public_ip);
                }
                ev.kv.lease != held.etcd_lease
                    || !value.is_ok_and(|v| v.public_ip == self.public_ip)
            }
        }
    }

    /// Takes a lease again after ours was lost, the old subnet when still free, retrying
    /// until it works; None when nobody listens any more.
    async fn reacquire(
        &mut self,
        old: Ipv4Network,
        backoff: &mut Duration,
        held_tx: &watch::Sender<HeldLease>,
    ) -> Option<HeldLease> {
        warn!(subnet = %old, "our lease was deleted or expired in etcd; re-acquiring it (flanneld would exit here)");
        loop {
            match self.reclaim(old).await {
                Ok(new) => {
                    if new.subnet == old {
                        info!(subnet = %new.subnet, "re-acquired the same subnet after our lease was lost");
                    } else {
                        warn!(old = %old, new = %new.subnet, "our previous subnet was taken by another node; acquired a new one");
                    }
                    return Some(new);
                }
                Err(err) => {
                    warn!(error = %err, "re-acquiring our lease failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(*backoff) => {}
                        _ = held_tx.closed() => return None,
                    }
                    *backoff = (*backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }
}

/// What looking for a lease with our PublicIP found.
enum Reuse {
    Held(HeldLease),
    Retry,
    NotFound,
}

/// How holding a lease ended.
enum Held {
    /// The watch broke or fell behind: check the key and watch again.
    Recheck,
    /// Nobody listens for lease changes any more (the agent is stopping).
    Closed,
    /// Deleted, expired or taken; `overwritten_by` when another PublicIP was written on it.
    Lost { overwritten_by: Option<Ipv4Addr> },
}

/// The next events on our key; `None` when the watch broke or fell behind (check again).
async fn next_watch_message<W: KvWatch>(
    stream: &mut Option<W>,
) -> Option<Vec<crate::control::store::KvEvent>> {
    match stream {
        Some(s) => match s.next().await {
            Ok(WatchBatch::Events(events)) => Some(events),
            Ok(WatchBatch::Outdated(why)) => {
                debug!(reason = %why, "lease key watch fell behind");
                None
            }
            Err(err) => {
                debug!(error = %err, "lease key watch broke");
                None
            }
        },
        // Without a watch, re-check every 10 s.
        None => {
            tokio::time::sleep(Duration::from_secs(10)).await;
            None
        }
    }
}

/// How long until the renewal is due: `margin` before expiry (half the TTL when the TTL is
/// shorter than the margin, as in tests).
fn renew_delay(held: &HeldLease, margin: Duration) -> Duration {
    let lead = if margin >= held.ttl {
        held.ttl / 2
    } else {
        margin
    };
    let due = held.renewed_at + held.ttl - lead;
    due.saturating_duration_since(Instant::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac() -> MacAddr6 {
        MacAddr6::new(0xc6, 0xd2, 0x32, 0x6f, 0x8f, 0x44)
    }

    #[test]
    fn vxlan_lease_json_is_flannels_byte_for_byte() {
        let json = encode_lease(
            "192.168.64.3".parse().expect("ip"),
            &LeaseAttrs::Vxlan {
                vni: 1,
                vtep_mac: mac(),
            },
        );
        assert_eq!(
            json,
            r#"{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}"#
        );
    }

    #[test]
    fn host_gw_lease_json_has_no_backend_data() {
        let json = encode_lease("192.168.64.3".parse().expect("ip"), &LeaseAttrs::HostGw);
        assert_eq!(
            json,
            r#"{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"host-gw"}"#
        );
    }

    #[test]
    fn decode_round_trips_and_accepts_go_casing() {
        let v = decode_lease(
            br#"{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}"#,
        )
        .expect("valid");
        assert_eq!(v.public_ip, Ipv4Addr::new(192, 168, 64, 3));
        assert_eq!(v.backend_type, "vxlan");
        assert_eq!(v.vtep_mac, Some(mac()));
        assert_eq!(v.vni, Some(1));
        let v = decode_lease(br#"{"publicip":"10.0.0.1","backendtype":"host-gw"}"#).expect("valid");
        assert_eq!(v.backend_type, "host-gw");
        assert!(decode_lease(b"garbage").is_err());
        assert!(decode_lease(br#"{"PublicIP":"nope"}"#).is_err());
        assert!(
            decode_lease(br#"{"PublicIP":"10.0.0.1","BackendData":{"VtepMAC":"zz"}}"#).is_err()
        );
    }

    #[test]
    fn to_peer_filters_by_backend() {
        let subnet: Ipv4Network = "10.5.3.0/24".parse().expect("net");
        let v = decode_lease(
            br#"{"PublicIP":"10.0.0.1","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}"#,
        )
        .expect("valid");
        let peer = v
            .to_peer(subnet, LeaseBackend::Vxlan)
            .expect("ok")
            .expect("vxlan peer");
        assert_eq!(peer.vtep_mac, Some(mac()));
        assert_eq!(v.to_peer(subnet, LeaseBackend::HostGw), Ok(None));
        let no_mac =
            decode_lease(br#"{"PublicIP":"10.0.0.1","BackendType":"vxlan"}"#).expect("valid");
        assert!(no_mac.to_peer(subnet, LeaseBackend::Vxlan).is_err());
    }

    #[test]
    fn subnet_keys() {
        let net: Ipv4Network = "10.5.52.0/24".parse().expect("net");
        assert_eq!(subnet_key_name(net), "10.5.52.0-24");
        assert_eq!(parse_subnet_key_name("10.5.52.0-24"), Some(net));
        assert_eq!(parse_subnet_key_name("10.5.52.1-24"), None);
        assert_eq!(parse_subnet_key_name("garbage"), None);
        assert_eq!(parse_subnet_key_name("10.5.52.0-24&fd00::-64"), None);
        let opts = EtcdOptions {
            prefix: "/kube-centos/network".into(),
            ..Default::default()
        };
        assert_eq!(
            subnet_key(&opts, net),
            "/kube-centos/network/subnets/10.5.52.0-24"
        );
        assert_eq!(parse_subnet_arg("10.5.52.0/24").expect("ok"), net);
        assert_eq!(parse_subnet_arg("10.5.52.0-24").expect("ok"), net);
        assert!(parse_subnet_arg("10.5.52.7/24").is_err());
        assert!(parse_subnet_arg("x").is_err());
    }

    #[test]
    fn renew_delay_respects_margin() {
        let held = HeldLease {
            subnet: "10.5.1.0/24".parse().expect("net"),
            etcd_lease: 1,
            renewed_at: Instant::now(),
            ttl: LEASE_TTL,
        };
        let d = renew_delay(&held, Duration::from_secs(3600));
        assert!(d <= Duration::from_secs(23 * 3600) && d > Duration::from_secs(23 * 3600 - 5));
        let short = HeldLease {
            ttl: Duration::from_secs(10),
            ..held
        };
        assert!(renew_delay(&short, Duration::from_secs(3600)) <= Duration::from_secs(5));
    }
}
