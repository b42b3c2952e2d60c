//! `--ip-masq`: flannel's masquerade rules, in flannel's own nftables table
//! (`ip flannel-ipv4`) so that a node migrating from flanneld's nftables mode takes its table
//! over instead of stacking a second copy.
//!
//! Rules go through nft's JSON interface (`nft -j -f -`) as one batch, which nft applies as
//! one transaction: the table is never seen half-written. The table is rewritten whole, so a
//! subnet change removes the old rules.
//!
//! The FORWARD accept rules are not here: an accept in this table cannot override a DROP
//! policy of iptables' FORWARD chain (every base chain runs). They live in iptables' filter
//! table, see [`crate::os::forward`]; a `forward` chain earlier versions put here is removed.

use std::{process::Stdio, time::Duration};

use ipnetwork::Ipv4Network;
use serde_json::{Value, json};
use tokio::{io::AsyncWriteExt, process::Command};
use tracing::{info, warn};

/// flannel's table and chain names.
pub const TABLE: &str = "flannel-ipv4";
const POSTROUTING_CHAIN: &str = "postrtg";
/// kube-proxy marks packets it wants masqueraded with this bit; flannel leaves them alone.
const KUBE_MASQ_MARK: u32 = 0x4000;
/// How many rules [`ruleset`] writes; a table with another count is re-applied.
const RULE_COUNT: usize = 6;

#[derive(Debug, thiserror::Error)]
pub enum MasqError {
    #[error("cannot run nft (install Debian's nftables package): {0}")]
    Spawn(#[source] std::io::Error),
    #[error("nft rejected the {TABLE} rules ({status}): {stderr}")]
    Rejected { status: String, stderr: String },
    #[error("cannot parse `nft -j list table ip {TABLE}`: {0}")]
    Parse(#[source] serde_json::Error),
}

/// The rules for our subnet inside the cluster network, as one nft JSON batch.
pub fn ruleset(network: Ipv4Network, subnet: Ipv4Network) -> Value {
    let table = json!({"family": "ip", "name": TABLE});
    let chain = |name: &str, kind: &str, hook: &str, prio: i32| {
        json!({"chain": {"family": "ip", "table": TABLE, "name": name,
            "type": kind, "hook": hook, "prio": prio, "policy": "accept"}})
    };
    let rule = |chain: &str, expr: Vec<Value>| json!({"add": {"rule": {"family": "ip", "table": TABLE, "chain": chain, "expr": expr}}});
    let postrouting = |expr: Vec<Value>| rule(POSTROUTING_CHAIN, expr);
    let masquerade = json!({"masquerade": {"flags": ["fully-random"]}});
    let ret = json!({"return": null});
    json!({"nftables": [
        // Add (so that the delete cannot fail), delete, re-create: also drops chains that
        // earlier versions kept here.
        {"add": {"table": table}},
        {"delete": {"table": table}},
        {"add": {"table": table}},
        // srcnat = 100: the priority flannel's nftables mode uses.
        {"add": chain(POSTROUTING_CHAIN, "nat", "postrouting", 100)},
        postrouting(vec![
            json!({"match": {"op": "==", "left": {"&": [{"meta": {"key": "mark"}}, KUBE_MASQ_MARK]}, "right": KUBE_MASQ_MARK}}),
            ret.clone(),
        ]),
        // Pod to pod inside the cluster network: never masqueraded.
        postrouting(vec![ip_match("saddr", "==", subnet), ip_match("daddr", "==", network), ret.clone()]),
        postrouting(vec![ip_match("saddr", "==", network), ip_match("daddr", "==", subnet), ret.clone()]),
        // Outside to our pods (e.g. NodePort traffic): left as it is.
        postrouting(vec![ip_match("saddr", "!=", network), ip_match("daddr", "==", subnet), ret]),
        // Pods to the outside world (not multicast): masqueraded to the node's address.
        postrouting(vec![
            ip_match("saddr", "==", network),
            ip_prefix_match("daddr", "!=", "224.0.0.0", 4),
            masquerade.clone(),
        ]),
        // Outside to other nodes' pods through us.
        postrouting(vec![ip_match("saddr", "!=", network), ip_match("daddr", "==", network), masquerade]),
    ]})
}

fn ip_match(field: &str, op: &str, net: Ipv4Network) -> Value {
    ip_prefix_match(field, op, &net.network().to_string(), net.prefix())
}

fn ip_prefix_match(field: &str, op: &str, addr: &str, len: u8) -> Value {
    json!({"match": {"op": op,
        "left": {"payload": {"protocol": "ip", "field": field}},
        "right": {"prefix": {"addr": addr, "len": len}}}})
}

/// Writes the rules (replacing whatever the table held).
pub async fn apply(network: Ipv4Network, subnet: Ipv4Network) -> Result<(), MasqError> {
    let batch = ruleset(network, subnet).to_string();
    let mut child = Command::new("nft")
        .args(["-j", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(MasqError::Spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(batch.as_bytes())
            .await
            .map_err(MasqError::Spawn)?;
    }
    let output = child.wait_with_output().await.map_err(MasqError::Spawn)?;
    if !output.status.success() {
        return Err(MasqError::Rejected {
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

/// How many rules the table holds now (0 when it does not exist).
pub async fn installed_rule_count() -> Result<usize, MasqError> {
    let output = Command::new("nft")
        .args(["-j", "list", "table", "ip", TABLE])
        .output()
        .await
        .map_err(MasqError::Spawn)?;
    if !output.status.success() {
        return Ok(0); // no such table
    }
    let listing: Value = serde_json::from_slice(&output.stdout).map_err(MasqError::Parse)?;
    Ok(listing["nftables"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter(|item| item.get("rule").is_some())
                .count()
        })
        .unwrap_or(0))
}

/// Installs the rules and keeps them: re-checks every `interval` and re-applies them when
/// someone deleted or changed them. Runs until the agent stops; errors are logged, not fatal.
pub async fn keep_rules(network: Ipv4Network, subnet: Ipv4Network, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    let mut installed = false;
    loop {
        ticker.tick().await;
        let count = match installed_rule_count().await {
            Ok(count) => count,
            Err(err) => {
                warn!(error = %err, "cannot check the ip-masq rules");
                continue;
            }
        };
        if count == RULE_COUNT && installed {
            continue;
        }
        match apply(network, subnet).await {
            Ok(()) if installed => {
                warn!(
                    table = TABLE,
                    found_rules = count,
                    "ip-masq rules were changed or removed; re-applied them"
                )
            }
            Ok(()) => {
                installed = true;
                info!(table = TABLE, %network, %subnet, "ip-masq rules installed");
            }
            Err(err) => warn!(error = %err, "installing the ip-masq rules failed; retrying"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ruleset_has_flannels_rules_in_flannels_order() {
        let network: Ipv4Network = "10.5.0.0/16".parse().expect("net");
        let subnet: Ipv4Network = "10.5.52.0/24".parse().expect("net");
        let batch = ruleset(network, subnet);
        let rules: Vec<&Value> = batch["nftables"]
            .as_array()
            .expect("array")
            .iter()
            .filter_map(|cmd| cmd["add"].get("rule"))
            .collect();
        assert_eq!(rules.len(), RULE_COUNT);
        let text = serde_json::to_string(&rules).expect("json");
        // Every masquerade is fully random, as flannel's --random-fully.
        assert_eq!(text.matches("fully-random").count(), 2);
        assert_eq!(
            rules[1]["expr"][0]["match"]["right"]["prefix"]["addr"],
            "10.5.52.0"
        );
        assert_eq!(rules[4]["expr"][1]["match"]["op"], "!=");
        assert_eq!(
            rules[4]["expr"][1]["match"]["right"]["prefix"]["addr"],
            "224.0.0.0"
        );
    }
}
