//! The key-value operations the lease, watch and config code need from etcd, over either of
//! etcd's two keyspaces: v3 (gRPC, flannel >= v0.18) and v2 (HTTP/JSON keys API, flanneld
//! <= v0.17 and every cluster of the seeds). The two do not see each other's keys.
//!
//! [`KvStore`] is implemented by [`etcd_client::Client`] (v3, [`v3`]), by [`V2Client`]
//! ([`v2`]) and by [`Store`], the one the agent picks at start-up with `--etcd-api`
//! ([`select`]). Nothing in the trait names a v2 or v3 detail: "revision" is the v3 revision
//! or the v2 index, and a key's "lease" is the v3 lease id (0 in v2, where the TTL sits on the
//! key itself).

pub mod select;
pub mod v2;
mod v3;

use std::{future::Future, time::Duration};

pub use select::{EtcdApi, EtcdApiChoice, connect_store};
pub use v2::V2Client;

use crate::control::etcd::{EtcdError, EtcdOptions};

/// One key as read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kv {
    pub key: String,
    pub value: Vec<u8>,
    /// The revision (v3) or index (v2) of the key's last change.
    pub mod_revision: i64,
    /// The v3 lease the key hangs on (0: none, and always 0 in v2).
    pub lease: i64,
    /// Seconds until the key expires, when the store tells it with the read (v2).
    pub ttl: Option<i64>,
}

/// What happened to a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Put,
    /// Deleted or expired.
    Delete,
}

/// One change seen by a watch. For a deletion `kv.value` is empty.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvEvent {
    pub kind: EventKind,
    pub kv: Kv,
}

/// What a watch delivers next.
#[derive(Debug)]
pub enum WatchBatch {
    Events(Vec<KvEvent>),
    /// The watch fell behind what etcd keeps (v3 compaction, v2 "event index cleared") or
    /// was canceled: list again.
    Outdated(String),
}

/// Until when a key lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyTtl {
    Never,
    Expired,
    Remaining(Duration),
}

/// A watch on one key or a prefix.
pub trait KvWatch: Send {
    /// The next batch; `Err` when the watch broke (list again after a pause).
    fn next(&mut self) -> impl Future<Output = Result<WatchBatch, EtcdError>> + Send;
}

/// The operations the agent and its subcommands need. Each error names the key.
pub trait KvStore: Clone + Send + Sync + 'static {
    type Watch: KvWatch + 'static;

    /// Which keyspace this is (for logs and status).
    fn api(&self) -> EtcdApi;

    /// A fresh connection with the same options (after an endpoint died).
    fn reconnect(&self, opts: &EtcdOptions)
    -> impl Future<Output = Result<Self, EtcdError>> + Send;

    /// One key, and the store's revision at the read.
    fn get(
        &mut self,
        key: &str,
    ) -> impl Future<Output = Result<(Option<Kv>, i64), EtcdError>> + Send;

    /// Every key under `prefix` (which ends with '/'), and the store's revision at the read.
    fn list(
        &mut self,
        prefix: &str,
    ) -> impl Future<Output = Result<(Vec<Kv>, i64), EtcdError>> + Send;

    /// Writes `key` without expiry (the network config).
    fn put(&mut self, key: &str, value: &str)
    -> impl Future<Output = Result<(), EtcdError>> + Send;

    /// Creates `key` expiring after `ttl` only if it does not exist. `Ok(None)`: it exists;
    /// `Ok(Some(lease))`: created, `lease` as in [`Kv::lease`].
    fn create(
        &mut self,
        key: &str,
        value: &str,
        ttl: Duration,
    ) -> impl Future<Output = Result<Option<i64>, EtcdError>> + Send;

    /// Overwrites `old.key` with a fresh `ttl` only if it did not change since `old` was read.
    fn replace(
        &mut self,
        old: &Kv,
        value: &str,
        ttl: Duration,
    ) -> impl Future<Output = Result<Option<i64>, EtcdError>> + Send;

    /// Deletes `old.key` only if it did not change since `old` was read.
    fn delete_unchanged(&mut self, old: &Kv) -> impl Future<Output = Result<(), EtcdError>> + Send;

    /// Deletes `key` (and frees its v3 lease). Whether it existed.
    fn delete(&mut self, key: &str) -> impl Future<Output = Result<bool, EtcdError>> + Send;

    /// Extends our key's life to `ttl` again. `Ok(None)` when it is gone or no longer holds
    /// `value` (v2) or its lease expired (v3); else the new TTL.
    fn renew(
        &mut self,
        key: &str,
        value: &str,
        lease: i64,
        ttl: Duration,
    ) -> impl Future<Output = Result<Option<Duration>, EtcdError>> + Send;

    /// Writes our value back on our key (on `lease` in v3; with `ttl` left in v2).
    fn rewrite(
        &mut self,
        key: &str,
        value: &str,
        lease: i64,
        ttl: Duration,
    ) -> impl Future<Output = Result<(), EtcdError>> + Send;

    /// How long `kv` still lives.
    fn time_to_live(&mut self, kv: &Kv) -> impl Future<Output = Result<KeyTtl, EtcdError>> + Send;

    /// Watches `key` (or everything under it with `prefix`) from revision `from` on.
    fn watch(
        &mut self,
        key: &str,
        prefix: bool,
        from: i64,
    ) -> impl Future<Output = Result<Self::Watch, EtcdError>> + Send;
}

/// The store chosen at start-up.
#[derive(Clone)]
#[expect(
    clippy::large_enum_variant,
    reason = "one per agent, cloned a handful of times at start-up"
)]
pub enum Store {
    V3(etcd_client::Client),
    V2(V2Client),
}

/// A watch on a [`Store`].
#[expect(clippy::large_enum_variant, reason = "one per running watch")]
pub enum StoreWatch {
    V3(<etcd_client::Client as KvStore>::Watch),
    V2(<V2Client as KvStore>::Watch),
}

impl From<etcd_client::Client> for Store {
    fn from(client: etcd_client::Client) -> Store {
        Store::V3(client)
    }
}

impl From<V2Client> for Store {
    fn from(client: V2Client) -> Store {
        Store::V2(client)
    }
}

impl KvWatch for StoreWatch {
    async fn next(&mut self) -> Result<WatchBatch, EtcdError> {
        match self {
            StoreWatch::V3(w) => w.next().await,
            StoreWatch::V2(w) => w.next().await,
        }
    }
}

/// Forwards a call to the chosen implementation.
macro_rules! both {
    ($self:expr, $c:ident => $call:expr) => {
        match $self {
            Store::V3($c) => $call,
            Store::V2($c) => $call,
        }
    };
}

impl KvStore for Store {
    type Watch = StoreWatch;

    fn api(&self) -> EtcdApi {
        both!(self, c => KvStore::api(c))
    }

    async fn reconnect(&self, opts: &EtcdOptions) -> Result<Store, EtcdError> {
        Ok(match self {
            Store::V3(c) => Store::V3(KvStore::reconnect(c, opts).await?),
            Store::V2(c) => Store::V2(KvStore::reconnect(c, opts).await?),
        })
    }

    async fn get(&mut self, key: &str) -> Result<(Option<Kv>, i64), EtcdError> {
        both!(self, c => KvStore::get(c, key).await)
    }

    async fn list(&mut self, prefix: &str) -> Result<(Vec<Kv>, i64), EtcdError> {
        both!(self, c => KvStore::list(c, prefix).await)
    }

    async fn put(&mut self, key: &str, value: &str) -> Result<(), EtcdError> {
        both!(self, c => KvStore::put(c, key, value).await)
    }

    async fn create(
        &mut self,
        key: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<Option<i64>, EtcdError> {
        both!(self, c => KvStore::create(c, key, value, ttl).await)
    }

    async fn replace(
        &mut self,
        old: &Kv,
        value: &str,
        ttl: Duration,
    ) -> Result<Option<i64>, EtcdError> {
        both!(self, c => KvStore::replace(c, old, value, ttl).await)
    }

    async fn delete_unchanged(&mut self, old: &Kv) -> Result<(), EtcdError> {
        both!(self, c => KvStore::delete_unchanged(c, old).await)
    }

    async fn delete(&mut self, key: &str) -> Result<bool, EtcdError> {
        both!(self, c => KvStore::delete(c, key).await)
    }

    async fn renew(
        &mut self,
        key: &str,
        value: &str,
        lease: i64,
        ttl: Duration,
    ) -> Result<Option<Duration>, EtcdError> {
        both!(self, c => KvStore::renew(c, key, value, lease, ttl).await)
    }

    async fn rewrite(
        &mut self,
        key: &str,
        value: &str,
        lease: i64,
        ttl: Duration,
    ) -> Result<(), EtcdError> {
        both!(self, c => KvStore::rewrite(c, key, value, lease, ttl).await)
    }

    async fn time_to_live(&mut self, kv: &Kv) -> Result<KeyTtl, EtcdError> {
        both!(self, c => KvStore::time_to_live(c, kv).await)
    }

    async fn watch(&mut self, key: &str, prefix: bool, from: i64) -> Result<StoreWatch, EtcdError> {
        Ok(match self {
            Store::V3(c) => StoreWatch::V3(KvStore::watch(c, key, prefix, from).await?),
            Store::V2(c) => StoreWatch::V2(KvStore::watch(c, key, prefix, from).await?),
        })
    }
}
