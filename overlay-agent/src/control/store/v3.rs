//! [`KvStore`] over etcd's v3 API (keys on etcd leases, transactions for compare-and-set).

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, DeleteOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    WatchOptions, WatchStream,
};
use tracing::debug;

use super::{EtcdApi, EventKind, KeyTtl, Kv, KvEvent, KvStore, KvWatch, WatchBatch};
use crate::control::etcd::{EtcdError, EtcdOptions, describe};

fn kv_of(kv: &etcd_client::KeyValue) -> Kv {
    Kv {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        value: kv.value().to_vec(),
        mod_revision: kv.mod_revision(),
        lease: kv.lease(),
        ttl: None,
    }
}

fn ttl_secs(ttl: Duration) -> i64 {
    ttl.as_secs().max(1) as i64
}

async fn grant(client: &mut Client, ttl: Duration) -> Result<i64, EtcdError> {
    let secs = ttl_secs(ttl);
    client
        .lease_grant(secs, None)
        .await
        .map(|r| r.id())
        .map_err(|e| EtcdError::request(format!("granting a {secs} s lease"), e))
}

async fn revoke_quietly(client: &mut Client, id: i64) {
    if let Err(err) = client.lease_revoke(id).await {
        debug!(lease = id, error = %describe(&err), "revoking an unused etcd lease failed; it will expire");
    }
}

/// Puts `value` on `key` on a new lease when `compare` holds; the lease id, or `None`.
async fn put_on_new_lease_if(
    client: &mut Client,
    key: &str,
    value: &str,
    ttl: Duration,
    compare: Compare,
) -> Result<Option<i64>, EtcdError> {
    let id = grant(client, ttl).await?;
    let txn = Txn::new().when([compare]).and_then([TxnOp::put(
        key,
        value,
        Some(PutOptions::new().with_lease(id)),
    )]);
    match client.txn(txn).await {
        Ok(resp) if resp.succeeded() => Ok(Some(id)),
        Ok(_) => {
            revoke_quietly(client, id).await;
            Ok(None)
        }
        Err(err) => {
            revoke_quietly(client, id).await;
            Err(EtcdError::request(format!("writing {key}"), err))
        }
    }
}

impl KvStore for Client {
    type Watch = V3Watch;

    fn api(&self) -> EtcdApi {
        EtcdApi::V3
    }

    async fn reconnect(&self, opts: &EtcdOptions) -> Result<Client, EtcdError> {
        crate::control::etcd::connect(opts).await
    }

    async fn get(&mut self, key: &str) -> Result<(Option<Kv>, i64), EtcdError> {
        let resp = Client::get(self, key, None)
            .await
            .map_err(|e| EtcdError::request(format!("reading {key}"), e))?;
        let revision = resp.header().map_or(0, |h| h.revision());
        Ok((resp.kvs().first().map(kv_of), revision))
    }

    async fn list(&mut self, prefix: &str) -> Result<(Vec<Kv>, i64), EtcdError> {
        let resp = Client::get(self, prefix, Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|e| EtcdError::request(format!("listing {prefix}"), e))?;
        let revision = resp.header().map_or(0, |h| h.revision());
        Ok((resp.kvs().iter().map(kv_of).collect(), revision))
    }

    async fn put(&mut self, key: &str, value: &str) -> Result<(), EtcdError> {
        Client::put(self, key, value, None)
            .await
            .map_err(|e| EtcdError::request(format!("writing {key}"), e))?;
        Ok(())
    }

    async fn create(
        &mut self,
        key: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<Option<i64>, EtcdError> {
        let absent = Compare::version(key, CompareOp::Equal, 0);
        put_on_new_lease_if(self, key, value, ttl, absent).await
    }

    async fn replace(
        &mut self,
        old: &Kv,
        value: &str,
        ttl: Duration,
    ) -> Result<Option<i64>, EtcdError> {
        let unchanged = Compare::mod_revision(old.key.as_str(), CompareOp::Equal, old.mod_revision);
        let id = put_on_new_lease_if(self, &old.key, value, ttl, unchanged).await?;
        if let Some(id) = id
            && old.lease != 0
            && old.lease != id
        {
            // The key now hangs on the new lease; the old one would only linger.
            revoke_quietly(self, old.lease).await;
        }
        Ok(id)
    }

    async fn delete_unchanged(&mut self, old: &Kv) -> Result<(), EtcdError> {
        let txn = Txn::new()
            .when([Compare::mod_revision(
                old.key.as_str(),
                CompareOp::Equal,
                old.mod_revision,
            )])
            .and_then([TxnOp::delete(old.key.as_str(), None)]);
        self.txn(txn)
            .await
            .map_err(|e| EtcdError::request(format!("deleting {}", old.key), e))?;
        Ok(())
    }

    async fn delete(&mut self, key: &str) -> Result<bool, EtcdError> {
        let resp = Client::delete(self, key, Some(DeleteOptions::new().with_prev_key()))
            .await
            .map_err(|e| EtcdError::request(format!("deleting {key}"), e))?;
        for kv in resp.prev_kvs() {
            if kv.lease() != 0 {
                // The key is gone already; a failed revoke only leaves a lease that expires.
                let _ = self.lease_revoke(kv.lease()).await;
            }
        }
        Ok(resp.deleted() > 0)
    }

    async fn renew(
        &mut self,
        _key: &str,
        _value: &str,
        lease: i64,
        _ttl: Duration,
    ) -> Result<Option<Duration>, EtcdError> {
        let failed = |e| EtcdError::request("renewing our lease", e);
        let (mut keeper, mut stream) = self.lease_keep_alive(lease).await.map_err(failed)?;
        keeper.keep_alive().await.map_err(failed)?;
        let resp = stream.message().await.map_err(failed)?;
        Ok(match resp {
            Some(r) if r.ttl() > 0 => Some(Duration::from_secs(r.ttl() as u64)),
            _ => None,
        })
    }

    async fn rewrite(
        &mut self,
        key: &str,
        value: &str,
        lease: i64,
        _ttl: Duration,
    ) -> Result<(), EtcdError> {
        Client::put(self, key, value, Some(PutOptions::new().with_lease(lease)))
            .await
            .map_err(|e| EtcdError::request(format!("writing our lease {key} back"), e))?;
        Ok(())
    }

    async fn time_to_live(&mut self, kv: &Kv) -> Result<KeyTtl, EtcdError> {
        if kv.lease == 0 {
            return Ok(KeyTtl::Never);
        }
        match self.lease_time_to_live(kv.lease, None).await {
            Ok(r) if r.ttl() > 0 => Ok(KeyTtl::Remaining(Duration::from_secs(r.ttl() as u64))),
            Ok(_) => Ok(KeyTtl::Expired),
            Err(err) => Err(EtcdError::request(
                format!("reading the TTL of {}", kv.key),
                err,
            )),
        }
    }

    async fn watch(&mut self, key: &str, prefix: bool, from: i64) -> Result<V3Watch, EtcdError> {
        let mut options = WatchOptions::new().with_start_revision(from);
        if prefix {
            options = options.with_prefix();
        }
        let stream = Client::watch(self, key, Some(options))
            .await
            .map_err(|e| EtcdError::request(format!("watching {key}"), e))?;
        Ok(V3Watch {
            key: key.to_string(),
            stream,
        })
    }
}

/// A v3 watch stream.
pub struct V3Watch {
    key: String,
    stream: WatchStream,
}

impl KvWatch for V3Watch {
    async fn next(&mut self) -> Result<WatchBatch, EtcdError> {
        let key = &self.key;
        let resp = match self.stream.message().await {
            Ok(Some(resp)) => resp,
            Ok(None) => {
                return Err(EtcdError::Request {
                    operation: format!("watching {key}"),
                    detail: "the watch ended".into(),
                });
            }
            Err(err) => return Err(EtcdError::request(format!("watching {key}"), err)),
        };
        if resp.compact_revision() != 0 {
            return Ok(WatchBatch::Outdated(format!(
                "the watch on {key} fell behind etcd compaction (revision {})",
                resp.compact_revision()
            )));
        }
        if resp.canceled() {
            return Ok(WatchBatch::Outdated(format!(
                "etcd canceled the watch on {key}: {}",
                resp.cancel_reason()
            )));
        }
        let events = resp
            .events()
            .iter()
            .filter_map(|ev| {
                let kind = match ev.event_type() {
                    EventType::Put => EventKind::Put,
                    EventType::Delete => EventKind::Delete,
                };
                ev.kv().map(|kv| KvEvent {
                    kind,
                    kv: kv_of(kv),
                })
            })
            .collect();
        Ok(WatchBatch::Events(events))
    }
}
