//! Choosing the uplink and public IP as flanneld does (`--iface`, `--iface-regex`,
//! `--iface-can-reach`, `--public-ip`, else the default-route interface).
//!
//! Precedence is flannel's: `--iface` (first entry that matches wins), then `--iface-regex`
//! (each pattern against every IPv4 address, then against every name), then
//! `--iface-can-reach`, then the interface of the default route.

use std::net::Ipv4Addr;

use regex::Regex;
use tracing::info;

use crate::os::netlink::{InterfaceAddress, Link, Netlink, NetlinkError};

/// The operator's choice, straight from the flags.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IfaceOptions {
    /// `--iface`, repeatable: interface names or IPv4 addresses; the first match wins.
    pub iface: Vec<String>,
    /// `--iface-regex`, repeatable: matched against addresses, then names.
    pub iface_regex: Vec<String>,
    /// `--iface-can-reach`: use the interface of the route to this address.
    pub iface_can_reach: Option<Ipv4Addr>,
    /// `--public-ip`: the address to advertise (default: the interface's own).
    pub public_ip: Option<Ipv4Addr>,
}

/// The chosen underlay interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Uplink {
    pub name: String,
    pub index: u32,
    /// The interface's own IPv4 address (the vxlan device's `local`).
    pub address: Ipv4Addr,
    /// The address advertised in the lease (`--public-ip`, else `address`).
    pub public_ip: Ipv4Addr,
    pub mtu: u32,
}

/// Why no uplink could be chosen. Every message lists the interfaces that exist here so the
/// operator can fix the flag at once.
#[derive(Debug, thiserror::Error)]
pub enum IfaceError {
    #[error("reading interfaces: {0}")]
    Netlink(#[from] NetlinkError),
    #[error("no interface matches {flag}; interfaces here: {available}")]
    NoMatch { flag: String, available: String },
    #[error(
        "interface {name} has no IPv4 address; give it one or pick another with --iface; interfaces here: {available}"
    )]
    NoAddress { name: String, available: String },
    #[error("--iface-regex={pattern} is not a valid regular expression: {source}")]
    BadRegex {
        pattern: String,
        #[source]
        source: regex::Error,
    },
    #[error("--iface-can-reach={target}: {reason}; interfaces here: {available}")]
    CannotReach {
        target: Ipv4Addr,
        reason: String,
        available: String,
    },
    #[error(
        "there is no default route to pick the uplink from; pass --iface=NAME (or --iface-regex / --iface-can-reach); interfaces here: {available}"
    )]
    NoDefaultRoute { available: String },
    #[error("interface {name} reports MTU 0; set an MTU on it (ip link set {name} mtu 1500)")]
    NoMtu { name: String },
}

/// Picks the uplink in the current network namespace.
pub async fn select_uplink(options: &IfaceOptions) -> Result<Uplink, IfaceError> {
    let netlink = Netlink::connect()?;
    let links = netlink.links().await?;
    let addresses = netlink.addresses(None).await?;
    let inventory = Inventory {
        links: &links,
        addresses: &addresses,
    };

    let (link, address) = if !options.iface.is_empty() {
        inventory.by_iface(&options.iface)?
    } else if !options.iface_regex.is_empty() {
        inventory.by_regex(&options.iface_regex)?
    } else if let Some(target) = options.iface_can_reach {
        let cannot_reach = |reason: String| IfaceError::CannotReach {
            target,
            reason,
            available: inventory.describe(),
        };
        let lookup = netlink
            .route_get(target)
            .await
            .map_err(|err| cannot_reach(err.to_string()))?;
        let index = lookup
            .oif
            .ok_or_else(|| cannot_reach("the route to it names no interface".into()))?;
        let link = inventory
            .link(index)
            .ok_or_else(|| cannot_reach(format!("the route to it uses unknown link #{index}")))?;
        // The route's preferred source is the address the kernel would use to reach the
        // target, as flannel takes it; fall back to the interface's first address.
        let address = match lookup.source {
            Some(source) if inventory.has_address(index, source) => source,
            _ => inventory.first_address(link)?,
        };
        (link, address)
    } else {
        let default = netlink
            .routes()
            .await?
            .into_iter()
            .find(|listed| listed.route.destination.prefix() == 0 && listed.route.oif.is_some())
            .and_then(|listed| listed.route.oif)
            .and_then(|index| inventory.link(index))
            .ok_or_else(|| IfaceError::NoDefaultRoute {
                available: inventory.describe(),
            })?;
        (default, inventory.first_address(default)?)
    };

    if link.mtu == 0 {
        return Err(IfaceError::NoMtu {
            name: link.name.clone(),
        });
    }
    let uplink = Uplink {
        name: link.name.clone(),
        index: link.index,
        address,
        public_ip: options.public_ip.unwrap_or(address),
        mtu: link.mtu,
    };
    info!(
        interface = %uplink.name,
        address = %uplink.address,
        public_ip = %uplink.public_ip,
        mtu = uplink.mtu,
        "using interface"
    );
    Ok(uplink)
}

/// The interfaces and addresses of the namespace, for the pure matching rules.
struct Inventory<'a> {
    links: &'a [Link],
    addresses: &'a [InterfaceAddress],
}

impl<'a> Inventory<'a> {
    fn link(&self, index: u32) -> Option<&'a Link> {
        self.links.iter().find(|link| link.index == index)
    }

    fn addresses_of(&self, index: u32) -> impl Iterator<Item = Ipv4Addr> + 'a {
        self.addresses
            .iter()
            .filter(move |address| address.index == index)
            .map(|address| address.address.ip())
    }

    fn has_address(&self, index: u32, ip: Ipv4Addr) -> bool {
        self.addresses_of(index).any(|own| own == ip)
    }

    fn first_address(&self, link: &Link) -> Result<Ipv4Addr, IfaceError> {
        self.addresses_of(link.index)
            .next()
            .ok_or_else(|| IfaceError::NoAddress {
                name: link.name.clone(),
                available: self.describe(),
            })
    }

    /// "eth0 (192.168.100.1), lo (127.0.0.1)": what the operator can choose from.
    fn describe(&self) -> String {
        let mut links: Vec<&Link> = self.links.iter().collect();
        links.sort_by_key(|link| link.index);
        links
            .iter()
            .map(|link| {
                let ips: Vec<String> = self
                    .addresses_of(link.index)
                    .map(|ip| ip.to_string())
                    .collect();
                if ips.is_empty() {
                    link.name.clone()
                } else {
                    format!("{} ({})", link.name, ips.join(", "))
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `--iface`: each entry is an IPv4 address or a name; the first entry that matches wins.
    fn by_iface(&self, wanted: &[String]) -> Result<(&'a Link, Ipv4Addr), IfaceError> {
        for entry in wanted {
            if let Ok(ip) = entry.parse::<Ipv4Addr>() {
                if let Some(owner) = self.addresses.iter().find(|a| a.address.ip() == ip)
                    && let Some(link) = self.link(owner.index)
                {
                    return Ok((link, ip));
                }
            } else if let Some(link) = self.links.iter().find(|link| link.name == *entry) {
                return Ok((link, self.first_address(link)?));
            }
        }
        Err(IfaceError::NoMatch {
            flag: wanted
                .iter()
                .map(|entry| format!("--iface={entry}"))
                .collect::<Vec<_>>()
                .join(" "),
            available: self.describe(),
        })
    }

    /// `--iface-regex`: per pattern, first every IPv4 address, then every name.
    fn by_regex(&self, patterns: &[String]) -> Result<(&'a Link, Ipv4Addr), IfaceError> {
        let mut links: Vec<&'a Link> = self.links.iter().collect();
        links.sort_by_key(|link| link.index);
        for pattern in patterns {
            let regex = Regex::new(pattern).map_err(|source| IfaceError::BadRegex {
                pattern: pattern.clone(),
                source,
            })?;
            for link in &links {
                if let Some(ip) = self
                    .addresses_of(link.index)
                    .find(|ip| regex.is_match(&ip.to_string()))
                {
                    return Ok((link, ip));
                }
            }
            for link in &links {
                if regex.is_match(&link.name) {
                    return Ok((link, self.first_address(link)?));
                }
            }
        }
        Err(IfaceError::NoMatch {
            flag: patterns
                .iter()
                .map(|pattern| format!("--iface-regex={pattern}"))
                .collect::<Vec<_>>()
                .join(" "),
            available: self.describe(),
        })
    }
}

#[cfg(test)]
mod tests {
    use ipnetwork::Ipv4Network;

    use super::*;

    fn link(index: u32, name: &str) -> Link {
        Link {
            index,
            name: name.into(),
            mtu: 1500,
            mac: None,
            up: true,
            kind: None,
            vxlan: None,
            master: None,
            peer_index: None,
            peer_netnsid: None,
        }
    }

    fn address(index: u32, cidr: &str) -> InterfaceAddress {
        InterfaceAddress {
            index,
            address: cidr.parse::<Ipv4Network>().expect("test CIDR"),
        }
    }

    fn fixture() -> (Vec<Link>, Vec<InterfaceAddress>) {
        (
            vec![
                link(1, "lo"),
                link(2, "eth0"),
                link(3, "eth1"),
                link(4, "dummy0"),
            ],
            vec![
                address(1, "127.0.0.1/8"),
                address(2, "192.168.100.1/24"),
                address(3, "10.0.0.7/16"),
                address(3, "10.1.0.7/16"),
            ],
        )
    }

    #[test]
    fn iface_by_name_ip_and_first_match_wins() {
        let (links, addresses) = fixture();
        let inventory = Inventory {
            links: &links,
            addresses: &addresses,
        };
        let (chosen, ip) = inventory.by_iface(&["eth1".into()]).expect("by name");
        assert_eq!(
            (chosen.name.as_str(), ip),
            ("eth1", "10.0.0.7".parse().expect("ip"))
        );
        // An IP selects its own interface and that exact address, not the first one.
        let (chosen, ip) = inventory.by_iface(&["10.1.0.7".into()]).expect("by ip");
        assert_eq!(
            (chosen.name.as_str(), ip),
            ("eth1", "10.1.0.7".parse().expect("ip"))
        );
        let (chosen, _) = inventory
            .by_iface(&["eth9".into(), "eth0".into(), "eth1".into()])
            .expect("first match");
        assert_eq!(chosen.name, "eth0");
    }

    #[test]
    fn iface_errors_list_what_exists() {
        let (links, addresses) = fixture();
        let inventory = Inventory {
            links: &links,
            addresses: &addresses,
        };
        let message = inventory
            .by_iface(&["eth9".into()])
            .expect_err("no eth9")
            .to_string();
        assert_eq!(
            message,
            "no interface matches --iface=eth9; interfaces here: lo (127.0.0.1), eth0 (192.168.100.1), eth1 (10.0.0.7, 10.1.0.7), dummy0"
        );
        let message = inventory
            .by_iface(&["dummy0".into()])
            .expect_err("no address")
            .to_string();
        assert!(
            message.starts_with("interface dummy0 has no IPv4 address"),
            "{message}"
        );
    }

    #[test]
    fn regex_tries_addresses_before_names() {
        let (links, addresses) = fixture();
        let inventory = Inventory {
            links: &links,
            addresses: &addresses,
        };
        // "1" matches the name eth1 but also the address 127.0.0.1 (lo), which wins.
        let (chosen, _) = inventory.by_regex(&["^192\\.168\\.".into()]).expect("ip");
        assert_eq!(chosen.name, "eth0");
        let (chosen, ip) = inventory.by_regex(&["^eth1$".into()]).expect("name");
        assert_eq!(
            (chosen.name.as_str(), ip),
            ("eth1", "10.0.0.7".parse().expect("ip"))
        );
        let (chosen, ip) = inventory
            .by_regex(&["^10\\.1\\.".into()])
            .expect("second ip");
        assert_eq!(
            (chosen.name.as_str(), ip),
            ("eth1", "10.1.0.7".parse().expect("ip"))
        );
        let (chosen, _) = inventory
            .by_regex(&["^wlan".into(), "^eth0$".into()])
            .expect("second pattern");
        assert_eq!(chosen.name, "eth0");
        assert!(matches!(
            inventory.by_regex(&["(".into()]),
            Err(IfaceError::BadRegex { .. })
        ));
        assert!(matches!(
            inventory.by_regex(&["^wlan".into()]),
            Err(IfaceError::NoMatch { .. })
        ));
    }
}
