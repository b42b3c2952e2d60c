//! Typed netlink helpers (rtnetlink) used by the dataplanes and interface selection.
//!
//! One module that speaks rtnetlink so the rest of the agent deals in plain values (links,
//! IPv4 networks, MACs) and gets errors that say what was being done to what.
//! Writes are idempotent where the kernel allows it (replace semantics, "already gone" on
//! delete is success), because every caller re-applies desired state.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr},
    sync::atomic::{AtomicU64, Ordering},
};

use futures_util::{Stream, StreamExt, TryStreamExt};
use ipnetwork::Ipv4Network;
use rtnetlink::{
    Handle, LinkUnspec, LinkVxlan, MulticastGroup, RouteMessageBuilder,
    packet_core::NetlinkPayload,
    packet_route::{
        AddressFamily, RouteNetlinkMessage,
        address::{AddressAttribute, AddressMessage},
        link::{InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage},
        neighbour::{
            NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
        },
        route::{
            RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol,
            RouteScope, RouteType,
        },
    },
    sys::AsyncSocket,
};
use tracing::debug;

use crate::peer::MacAddr6;

const ENOENT: i32 = 2;
const ESRCH: i32 = 3;
const ENODEV: i32 = 19;
const EEXIST: i32 = 17;
const EADDRNOTAVAIL: i32 = 99;

/// A failed netlink operation, with what was being done.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("cannot open a netlink socket: {0} (the agent needs CAP_NET_ADMIN)")]
    Connect(#[source] std::io::Error),
    #[error("{what}: {source}")]
    Request {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("{what}: {reason}")]
    Invalid { what: String, reason: String },
}

impl NetlinkError {
    fn request(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> Self {
        let what = what.into();
        move |source| NetlinkError::Request { what, source }
    }

    /// The kernel's errno (positive), if the kernel refused the request.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::Request {
                source: rtnetlink::Error::NetlinkError(message),
                ..
            } => message.code.map(|code| code.get().abs()),
            _ => None,
        }
    }

    fn is_not_found(&self) -> bool {
        matches!(self.errno(), Some(ENOENT | ESRCH | ENODEV | EADDRNOTAVAIL))
    }
}

/// VXLAN settings of a link, as the kernel reports them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VxlanInfo {
    pub vni: u32,
    pub local: Option<Ipv4Addr>,
    /// Index of the underlay device (`dev`).
    pub dev: Option<u32>,
    pub port: u16,
    pub learning: bool,
    pub gbp: bool,
}

/// A network interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mtu: u32,
    pub mac: Option<MacAddr6>,
    /// Administratively up (`IFF_UP`).
    pub up: bool,
    /// `IFLA_INFO_KIND` ("vxlan", "bridge", "veth", ...), absent for plain devices.
    pub kind: Option<String>,
    pub vxlan: Option<VxlanInfo>,
    /// `IFLA_MASTER`: the bridge (or bond) this link is a port of.
    pub master: Option<u32>,
    /// `IFLA_LINK`: for a veth, its peer's index (in the peer's namespace).
    pub peer_index: Option<u32>,
    /// `IFLA_LINK_NETNSID`: the id, as our namespace knows it, of the namespace the peer is
    /// in (absent when the peer is in ours).
    pub peer_netnsid: Option<i32>,
}

/// What to create: a flannel-style VXLAN device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VxlanSpec {
    pub name: String,
    pub vni: u32,
    pub local: Ipv4Addr,
    /// Underlay device index.
    pub dev: u32,
    pub port: u16,
    pub learning: bool,
    pub gbp: bool,
    pub mtu: u32,
    pub mac: MacAddr6,
}

/// An IPv4 address on an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InterfaceAddress {
    pub index: u32,
    /// Address with its prefix length (e.g. 192.168.100.1/24).
    pub address: Ipv4Network,
}

/// An IPv4 unicast route in the main table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Route {
    pub destination: Ipv4Network,
    pub gateway: Option<Ipv4Addr>,
    pub oif: Option<u32>,
    /// `onlink`: the gateway is reachable on `oif` without a covering connected route.
    pub onlink: bool,
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.destination)?;
        if let Some(gateway) = self.gateway {
            write!(f, " via {gateway}")?;
        }
        if let Some(oif) = self.oif {
            write!(f, " dev #{oif}")?;
        }
        if self.onlink {
            f.write_str(" onlink")?;
        }
        Ok(())
    }
}

/// A route from the kernel's main table, with the fields the dataplanes judge ownership by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListedRoute {
    pub route: Route,
    pub protocol: RouteProtocol,
    pub scope: RouteScope,
    /// `nhid`: the nexthop object the route goes through (the kernel still reports its
    /// gateway and device in `route`, as `ip route` shows them).
    pub nexthop_id: Option<u32>,
}

/// An IPv4 neighbour (ARP) entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Neighbour {
    pub index: u32,
    pub ip: Ipv4Addr,
    pub mac: Option<MacAddr6>,
    pub permanent: bool,
}

/// A bridge FDB entry on a device (for vxlan: which VTEP a MAC lives behind).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FdbEntry {
    pub index: u32,
    pub mac: MacAddr6,
    pub dst: Option<Ipv4Addr>,
    pub permanent: bool,
    /// `self` (NTF_SELF): the entry lives in the device's own table, not a bridge master's.
    pub own: bool,
}

/// A link change seen on the multicast link group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkEvent {
    /// A link appeared or changed (flags, MTU, address...).
    Changed(Link),
    /// A link was deleted.
    Deleted { index: u32, name: String },
}

/// A change the kernel announced on the link, neighbour and IPv4 route multicast groups,
/// reduced to what a dataplane needs to notice that state it owns was touched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelChange {
    /// A link appeared or changed (flags, MTU, address...).
    LinkChanged { index: u32 },
    /// A link was deleted (its routes, neighbours and FDB entries went with it).
    LinkDeleted { index: u32 },
    /// A main-table IPv4 route was added or replaced.
    RouteAdded(Route),
    /// A main-table IPv4 route was deleted.
    RouteDeleted(Route),
    /// An IPv4 neighbour was deleted.
    NeighbourDeleted { index: u32, ip: Ipv4Addr },
    /// A bridge FDB entry was deleted.
    FdbDeleted {
        index: u32,
        mac: MacAddr6,
        dst: Option<Ipv4Addr>,
    },
    /// A nexthop object was deleted (and with it, silently, every route through it).
    NexthopDeleted { id: u32 },
    /// The socket's buffer overflowed: some changes were lost, so the dataplane must look at
    /// everything once.
    Overrun,
}

/// Every write request this process sent (routes, neighbours, FDB entries, links,
/// addresses): `/metrics` shows it, and tests use it to prove that a resync which changes
/// nothing writes nothing.
static WRITES: AtomicU64 = AtomicU64::new(0);

/// How many netlink write requests this process has sent so far.
pub fn writes_total() -> u64 {
    WRITES.load(Ordering::Relaxed)
}

pub(crate) fn count_write() {
    WRITES.fetch_add(1, Ordering::Relaxed);
}

/// Receive buffer for the change subscription: a first sync of 20,000 peers makes 60,000
/// route/neighbour/FDB notifications in a burst; with the default ~200 KiB most would be
/// lost, each loss costing a full check.
const CHANGES_RCVBUF: usize = 8 << 20;

/// The multicast groups a change socket joins when told to. A dataplane that programs
/// 10,000 peers at start would otherwise be told of each of its 40,000 writes (the kernel
/// copies each one to the socket, we receive and parse it, then drop it); joining after
/// its first sync and checking everything once costs far less.
pub struct Membership {
    /// The change socket itself, through a second descriptor (the first is owned by the
    /// connection task that reads it).
    socket: rtnetlink::sys::Socket,
    groups: Vec<u32>,
}

impl Membership {
    pub(crate) fn of(
        socket: &rtnetlink::sys::Socket,
        groups: Vec<u32>,
    ) -> Result<Self, NetlinkError> {
        use std::os::fd::{AsFd as _, FromRawFd as _, IntoRawFd as _};
        // try_clone_to_owned duplicates with FD_CLOEXEC: no child process inherits it.
        let fd = socket
            .as_fd()
            .try_clone_to_owned()
            .map_err(NetlinkError::Connect)?;
        // SAFETY: `fd` is a descriptor we own, of a netlink socket; the Socket owns it now.
        let socket = unsafe { rtnetlink::sys::Socket::from_raw_fd(fd.into_raw_fd()) };
        Ok(Self { socket, groups })
    }

    /// Joins the groups: notifications arrive from now on.
    pub fn join(&self) -> Result<(), NetlinkError> {
        for group in &self.groups {
            self.socket
                .add_membership(*group)
                .map_err(NetlinkError::Connect)?;
        }
        Ok(())
    }
}

/// A handle to rtnetlink. Cheap to clone; the connection runs as a tokio task that ends when
/// the last handle is dropped.
#[derive(Clone, Debug)]
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Opens a netlink socket in the current network namespace. Needs a tokio runtime.
    pub fn connect() -> Result<Self, NetlinkError> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Connect)?;
        tokio::spawn(connection);
        Ok(Netlink { handle })
    }

    // ---------------------------------------------------------------- links

    /// All links.
    pub async fn links(&self) -> Result<Vec<Link>, NetlinkError> {
        let messages: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(NetlinkError::request("listing links"))?;
        Ok(messages.iter().map(link_from_message).collect())
    }

    /// The link with this name, or `None`.
    pub async fn link_by_name(&self, name: &str) -> Result<Option<Link>, NetlinkError> {
        let result: Result<Vec<LinkMessage>, _> = self
            .handle
            .link()
            .get()
            .match_name(name)
            .execute()
            .try_collect()
            .await;
        single_link(result, format!("looking up link {name}"))
    }

    /// The link with this index, or `None`.
    pub async fn link_by_index(&self, index: u32) -> Result<Option<Link>, NetlinkError> {
        let result: Result<Vec<LinkMessage>, _> = self
            .handle
            .link()
            .get()
            .match_index(index)
            .execute()
            .try_collect()
            .await;
        single_link(result, format!("looking up link #{index}"))
    }

    /// The link with index `index` in the network namespace our namespace knows as `nsid`
    /// (`IFLA_TARGET_NETNSID`: read without entering it), or `None`.
    pub async fn link_in_netns(&self, nsid: i32, index: u32) -> Result<Option<Link>, NetlinkError> {
        let mut request = self.handle.link().get().match_index(index);
        request
            .message_mut()
            .attributes
            .push(LinkAttribute::IfNetnsId(nsid));
        let result: Result<Vec<LinkMessage>, _> = request.execute().try_collect().await;
        single_link(
            result,
            format!("looking up link #{index} in netns id {nsid}"),
        )
    }

    /// Creates a VXLAN device (`ip link add NAME type vxlan id VNI local LOCAL dev DEV
    /// dstport PORT [nolearning] [gbp]` with MTU and MAC set at creation).
    pub async fn create_vxlan(&self, spec: &VxlanSpec) -> Result<(), NetlinkError> {
        count_write();
        let mut builder = LinkVxlan::new(&spec.name, spec.vni)
            .local(spec.local)
            .dev(spec.dev)
            .port(spec.port)
            .learning(spec.learning)
            .mtu(spec.mtu)
            .address(spec.mac.as_bytes().to_vec());
        if spec.gbp {
            builder = builder.gbp();
        }
        self.handle
            .link()
            .add(builder.build())
            .execute()
            .await
            .map_err(NetlinkError::request(format!(
                "creating vxlan device {} (id {}, local {}, dev #{}, dstport {})",
                spec.name, spec.vni, spec.local, spec.dev, spec.port
            )))?;
        debug!(device = %spec.name, vni = spec.vni, mac = %spec.mac, "created vxlan device");
        Ok(())
    }

    /// Deletes a link; a link that is already gone is not an error.
    pub async fn delete_link(&self, index: u32) -> Result<(), NetlinkError> {
        count_write();
        let result = self
            .handle
            .link()
            .del(index)
            .execute()
            .await
            .map_err(NetlinkError::request(format!("deleting link #{index}")));
        ignore_not_found(result)
    }

    /// `ip link set dev INDEX up`.
    pub async fn set_link_up(&self, index: u32) -> Result<(), NetlinkError> {
        count_write();
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(NetlinkError::request(format!("setting link #{index} up")))
    }

    /// `ip link set dev INDEX mtu MTU`.
    pub async fn set_link_mtu(&self, index: u32, mtu: u32) -> Result<(), NetlinkError> {
        count_write();
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).mtu(mtu).build())
            .execute()
            .await
            .map_err(NetlinkError::request(format!(
                "setting MTU {mtu} on link #{index}"
            )))
    }

    /// A stream of link changes (RTNLGRP_LINK) in this namespace. Lets a dataplane react at
    /// once to a deleted device or a new bridge instead of waiting for its next poll.
    pub fn link_events() -> Result<impl Stream<Item = LinkEvent>, NetlinkError> {
        let (connection, _handle, messages) =
            rtnetlink::new_multicast_connection(&[MulticastGroup::Link])
                .map_err(NetlinkError::Connect)?;
        tokio::spawn(connection);
        Ok(messages.filter_map(|(message, _)| async move {
            match message.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => {
                    Some(LinkEvent::Changed(link_from_message(&link)))
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(link)) => {
                    let link = link_from_message(&link);
                    Some(LinkEvent::Deleted {
                        index: link.index,
                        name: link.name,
                    })
                }
                _ => None,
            }
        }))
    }

    /// A stream of changes on the link, neighbour (incl. FDB) and IPv4 route groups in this
    /// namespace: how a dataplane learns at once that someone deleted its route, neighbour,
    /// FDB entry or device, instead of dumping everything every second. The stream yields
    /// [`KernelChange::Overrun`] when notifications were lost and ends if the socket fails.
    ///
    /// The socket joins the groups when [`Membership::join`] is called, not before.
    pub fn kernel_changes()
    -> Result<(impl Stream<Item = KernelChange> + Send, Membership), NetlinkError> {
        let (mut connection, _handle, messages) =
            rtnetlink::new_multicast_connection(&[]).map_err(NetlinkError::Connect)?;
        // SO_RCVBUFFORCE (we hold CAP_NET_ADMIN): SO_RCVBUF would be capped at rmem_max.
        let socket = connection.socket_mut().socket_mut();
        let membership = Membership::of(
            socket,
            [
                MulticastGroup::Link,
                MulticastGroup::Neigh,
                MulticastGroup::Ipv4Route,
            ]
            .map(|group| group as u32)
            .to_vec(),
        )?;
        if let Err(err) = nix::sys::socket::setsockopt(
            &socket,
            nix::sys::socket::sockopt::RcvBufForce,
            &CHANGES_RCVBUF,
        ) {
            debug!(error = %err, "cannot enlarge the netlink change socket's buffer; overruns cost full checks");
        }
        tokio::spawn(connection);
        let changes = messages.filter_map(|(message, _)| async move {
            match message.payload {
                NetlinkPayload::Overrun(_) => Some(KernelChange::Overrun),
                NetlinkPayload::InnerMessage(inner) => kernel_change(inner),
                _ => None,
            }
        });
        Ok((changes, membership))
    }

    // ------------------------------------------------------------ addresses

    /// IPv4 addresses, of one link or of all links.
    pub async fn addresses(
        &self,
        index: Option<u32>,
    ) -> Result<Vec<InterfaceAddress>, NetlinkError> {
        let mut request = self.handle.address().get();
        if let Some(index) = index {
            request = request.set_link_index_filter(index);
        }
        let messages: Vec<AddressMessage> = request
            .execute()
            .try_collect()
            .await
            .map_err(NetlinkError::request("listing addresses"))?;
        Ok(messages
            .iter()
            .filter(|message| message.header.family == AddressFamily::Inet)
            .filter_map(|message| {
                // IFA_LOCAL is the interface's own address (IFA_ADDRESS is the peer on p2p links).
                let ip = message
                    .attributes
                    .iter()
                    .find_map(|attribute| match attribute {
                        AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
                        _ => None,
                    })
                    .or_else(|| {
                        message
                            .attributes
                            .iter()
                            .find_map(|attribute| match attribute {
                                AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
                                _ => None,
                            })
                    })?;
                Some(InterfaceAddress {
                    index: message.header.index,
                    address: Ipv4Network::new(ip, message.header.prefix_len).ok()?,
                })
            })
            .collect())
    }

    /// IPv4 addresses of link `index` in the network namespace our namespace knows as `nsid`.
    /// The kernel honours `IFA_TARGET_NETNSID` in dumps only with strict checking, so this
    /// uses a connection of its own with `NETLINK_GET_STRICT_CHK` on.
    pub async fn addresses_in_netns(
        nsid: i32,
        index: u32,
    ) -> Result<Vec<Ipv4Network>, NetlinkError> {
        let (connection, handle, _) =
            rtnetlink::new_connection_with_strict_check().map_err(NetlinkError::Connect)?;
        let task = tokio::spawn(connection);
        let mut request = handle.address().get().set_link_index_filter(index);
        request.message_mut().header.family = AddressFamily::Inet;
        request
            .message_mut()
            .attributes
            .push(AddressAttribute::TargetNetNsId(nsid));
        let messages: Result<Vec<AddressMessage>, _> = request.execute().try_collect().await;
        task.abort();
        let messages = messages.map_err(NetlinkError::request(format!(
            "listing addresses of link #{index} in netns id {nsid}"
        )))?;
        Ok(messages
            .iter()
            .filter(|message| message.header.family == AddressFamily::Inet)
            .filter_map(|message| {
                message
                    .attributes
                    .iter()
                    .find_map(|attribute| match attribute {
                        AddressAttribute::Local(IpAddr::V4(ip))
                        | AddressAttribute::Address(IpAddr::V4(ip)) => {
                            Ipv4Network::new(*ip, message.header.prefix_len).ok()
                        }
                        _ => None,
                    })
            })
            .collect())
    }

    /// Adds an IPv4 address; an address that is already there is not an error.
    pub async fn add_address(&self, index: u32, address: Ipv4Network) -> Result<(), NetlinkError> {
        count_write();
        let result = self
            .handle
            .address()
            .add(index, IpAddr::V4(address.ip()), address.prefix())
            .execute()
            .await
            .map_err(NetlinkError::request(format!(
                "adding address {address} to link #{index}"
            )));
        match result {
            Err(err) if err.errno() == Some(EEXIST) => Ok(()),
            other => other,
        }
    }

    /// Deletes an IPv4 address; one that is already gone is not an error.
    pub async fn delete_address(
        &self,
        index: u32,
        address: Ipv4Network,
    ) -> Result<(), NetlinkError> {
        count_write();
        let mut message = AddressMessage::default();
        message.header.family = AddressFamily::Inet;
        message.header.index = index;
        message.header.prefix_len = address.prefix();
        message
            .attributes
            .push(AddressAttribute::Local(IpAddr::V4(address.ip())));
        message
            .attributes
            .push(AddressAttribute::Address(IpAddr::V4(address.ip())));
        let result =
            self.handle
                .address()
                .del(message)
                .execute()
                .await
                .map_err(NetlinkError::request(format!(
                    "deleting address {address} from link #{index}"
                )));
        ignore_not_found(result)
    }

    // --------------------------------------------------------------- routes

    /// IPv4 unicast routes of the main table.
    pub async fn routes(&self) -> Result<Vec<ListedRoute>, NetlinkError> {
        let messages: Vec<RouteMessage> = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(NetlinkError::request("listing routes"))?;
        Ok(messages
            .iter()
            .filter(|message| {
                message.header.address_family == AddressFamily::Inet
                    && route_table(message) == u32::from(RouteHeader::RT_TABLE_MAIN)
                    && message.header.kind == RouteType::Unicast
            })
            .map(|message| ListedRoute {
                route: route_from_message(message),
                protocol: message.header.protocol,
                scope: message.header.scope,
                nexthop_id: message
                    .attributes
                    .iter()
                    .find_map(|attribute| match attribute {
                        RouteAttribute::NhId(id) => Some(*id),
                        _ => None,
                    }),
            })
            .collect())
    }

    /// Adds or replaces a route in the main table (`ip route replace`), proto boot like
    /// `ip route add` and flannel.
    pub async fn replace_route(&self, route: &Route) -> Result<(), NetlinkError> {
        self.replace_route_message(route_message(route), format!("replacing route {route}"))
            .await
    }

    /// Deletes a route; one that is already gone is not an error.
    pub async fn delete_route(&self, route: &Route) -> Result<(), NetlinkError> {
        self.delete_route_message(route_message(route), format!("deleting route {route}"))
            .await
    }

    /// Adds or replaces the route to `destination` through nexthop object `id` (`ip route
    /// replace <destination> nhid <id>`), proto boot as [`Netlink::replace_route`].
    pub async fn replace_route_via_nexthop(
        &self,
        destination: Ipv4Network,
        id: u32,
    ) -> Result<(), NetlinkError> {
        self.replace_route_message(
            nexthop_route_message(destination, id),
            format!("replacing route {destination} nhid {id}"),
        )
        .await
    }

    /// Deletes the route to `destination` through nexthop object `id`; one already gone is
    /// not an error. (A delete naming a gateway and device does not match such a route.)
    pub async fn delete_route_via_nexthop(
        &self,
        destination: Ipv4Network,
        id: u32,
    ) -> Result<(), NetlinkError> {
        self.delete_route_message(
            nexthop_route_message(destination, id),
            format!("deleting route {destination} nhid {id}"),
        )
        .await
    }

    async fn replace_route_message(
        &self,
        message: RouteMessage,
        what: String,
    ) -> Result<(), NetlinkError> {
        count_write();
        self.handle
            .route()
            .add(message)
            .replace()
            .execute()
            .await
            .map_err(NetlinkError::request(what))
    }

    async fn delete_route_message(
        &self,
        mut message: RouteMessage,
        what: String,
    ) -> Result<(), NetlinkError> {
        count_write();
        // Match any protocol/scope so we can delete what the kernel reports back to us.
        message.header.protocol = RouteProtocol::Unspec;
        message.header.scope = RouteScope::NoWhere;
        let result = self
            .handle
            .route()
            .del(message)
            .execute()
            .await
            .map_err(NetlinkError::request(what));
        ignore_not_found(result)
    }

    /// The kernel's route to `destination` (`ip route get`): outgoing interface, gateway
    /// (None when the destination is on a connected subnet) and preferred source.
    pub async fn route_get(&self, destination: Ipv4Addr) -> Result<RouteLookup, NetlinkError> {
        let mut message = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(destination, 32)
            .build();
        // A lookup, not a route: no table/protocol/type in the request.
        message.header.table = RouteHeader::RT_TABLE_UNSPEC;
        message.header.protocol = RouteProtocol::Unspec;
        message.header.kind = RouteType::Unspec;
        let messages: Vec<RouteMessage> = self
            .handle
            .route()
            .get(message)
            .execute()
            .try_collect()
            .await
            .map_err(NetlinkError::request(format!(
                "looking up the route to {destination}"
            )))?;
        let message = messages.first().ok_or_else(|| NetlinkError::Invalid {
            what: format!("looking up the route to {destination}"),
            reason: "the kernel returned no route".into(),
        })?;
        let route = route_from_message(message);
        let source = message
            .attributes
            .iter()
            .find_map(|attribute| match attribute {
                RouteAttribute::PrefSource(RouteAddress::Inet(ip)) => Some(*ip),
                _ => None,
            });
        Ok(RouteLookup {
            oif: route.oif,
            gateway: route.gateway,
            source,
        })
    }

    // ----------------------------------------------------------- neighbours

    /// Neighbour-table entries of `family` (Inet: ARP; Bridge: FDB) on link `index`.
    async fn neighbour_dump(
        &self,
        family: AddressFamily,
        index: u32,
        what: &'static str,
    ) -> Result<Vec<NeighbourMessage>, NetlinkError> {
        let messages: Vec<NeighbourMessage> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(family)
            .execute()
            .try_collect()
            .await
            .map_err(NetlinkError::request(what))?;
        Ok(messages
            .into_iter()
            .filter(|message| message.header.family == family && message.header.ifindex == index)
            .collect())
    }

    /// IPv4 neighbours of one link.
    pub async fn neighbours(&self, index: u32) -> Result<Vec<Neighbour>, NetlinkError> {
        let messages = self
            .neighbour_dump(AddressFamily::Inet, index, "listing neighbours")
            .await?;
        Ok(messages
            .iter()
            .filter_map(|message| {
                let ip = neighbour_ip(message)?;
                Some(Neighbour {
                    index,
                    ip,
                    mac: neighbour_mac(message),
                    permanent: is_permanent(message.header.state),
                })
            })
            .collect())
    }

    /// `ip neigh replace IP lladdr MAC dev INDEX nud permanent`.
    pub async fn replace_neighbour(
        &self,
        index: u32,
        ip: Ipv4Addr,
        mac: MacAddr6,
    ) -> Result<(), NetlinkError> {
        count_write();
        self.handle
            .neighbours()
            .add(index, IpAddr::V4(ip))
            .kind(RouteType::Unicast)
            .state(NeighbourState::Permanent)
            .link_layer_address(mac.as_bytes())
            .replace()
            .execute()
            .await
            .map_err(NetlinkError::request(format!(
                "setting neighbour {ip} lladdr {mac} on link #{index}"
            )))
    }

    /// `ip neigh del IP dev INDEX`; one that is already gone is not an error.
    pub async fn delete_neighbour(&self, index: u32, ip: Ipv4Addr) -> Result<(), NetlinkError> {
        count_write();
        let mut message = NeighbourMessage::default();
        message.header.family = AddressFamily::Inet;
        message.header.ifindex = index;
        message
            .attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
        self.delete_neighbour_message(message, format!("deleting neighbour {ip} on link #{index}"))
            .await
    }

    /// RTM_DELNEIGH for a neighbour or an FDB entry; one that is already gone is success.
    async fn delete_neighbour_message(
        &self,
        message: NeighbourMessage,
        what: String,
    ) -> Result<(), NetlinkError> {
        let result = self
            .handle
            .neighbours()
            .del(message)
            .execute()
            .await
            .map_err(NetlinkError::request(what));
        ignore_not_found(result)
    }

    // ------------------------------------------------------------------ FDB

    /// Bridge FDB entries of one device (`bridge fdb show dev DEV`).
    pub async fn fdb_entries(&self, index: u32) -> Result<Vec<FdbEntry>, NetlinkError> {
        let messages = self
            .neighbour_dump(AddressFamily::Bridge, index, "listing bridge FDB entries")
            .await?;
        Ok(messages
            .iter()
            .filter_map(|message| {
                Some(FdbEntry {
                    index,
                    mac: neighbour_mac(message)?,
                    dst: fdb_dst(message),
                    permanent: is_permanent(message.header.state),
                    own: message.header.flags.contains(NeighbourFlags::Own),
                })
            })
            .collect())
    }

    /// `bridge fdb replace MAC dev INDEX dst DST self permanent`.
    pub async fn replace_fdb(
        &self,
        index: u32,
        mac: MacAddr6,
        dst: Ipv4Addr,
    ) -> Result<(), NetlinkError> {
        count_write();
        self.handle
            .neighbours()
            .add_bridge(index, mac.as_bytes())
            .flags(NeighbourFlags::Own)
            .state(NeighbourState::Permanent)
            .destination(IpAddr::V4(dst))
            .replace()
            .execute()
            .await
            .map_err(NetlinkError::request(format!(
                "setting FDB entry {mac} dst {dst} on link #{index}"
            )))
    }

    /// `bridge fdb del MAC dev INDEX dst DST self`; one that is already gone is not an error.
    pub async fn delete_fdb(
        &self,
        index: u32,
        mac: MacAddr6,
        dst: Option<Ipv4Addr>,
    ) -> Result<(), NetlinkError> {
        count_write();
        let mut message = NeighbourMessage::default();
        message.header.family = AddressFamily::Bridge;
        message.header.ifindex = index;
        message.header.flags = NeighbourFlags::Own;
        message
            .attributes
            .push(NeighbourAttribute::LinkLayerAddress(
                mac.as_bytes().to_vec(),
            ));
        if let Some(dst) = dst {
            message
                .attributes
                .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(dst)));
        }
        self.delete_neighbour_message(
            message,
            format!("deleting FDB entry {mac} on link #{index}"),
        )
        .await
    }
}

/// Result of [`Netlink::route_get`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteLookup {
    pub oif: Option<u32>,
    pub gateway: Option<Ipv4Addr>,
    pub source: Option<Ipv4Addr>,
}

fn kernel_change(message: RouteNetlinkMessage) -> Option<KernelChange> {
    let main_unicast_v4 = |route: &RouteMessage| {
        route.header.address_family == AddressFamily::Inet
            && route_table(route) == u32::from(RouteHeader::RT_TABLE_MAIN)
            && route.header.kind == RouteType::Unicast
    };
    match message {
        RouteNetlinkMessage::NewLink(link) => Some(KernelChange::LinkChanged {
            index: link.header.index,
        }),
        RouteNetlinkMessage::DelLink(link) => Some(KernelChange::LinkDeleted {
            index: link.header.index,
        }),
        RouteNetlinkMessage::NewRoute(route) if main_unicast_v4(&route) => {
            Some(KernelChange::RouteAdded(route_from_message(&route)))
        }
        RouteNetlinkMessage::DelRoute(route) if main_unicast_v4(&route) => {
            Some(KernelChange::RouteDeleted(route_from_message(&route)))
        }
        RouteNetlinkMessage::DelNeighbour(neighbour) => {
            let index = neighbour.header.ifindex;
            match neighbour.header.family {
                AddressFamily::Inet => {
                    neighbour_ip(&neighbour).map(|ip| KernelChange::NeighbourDeleted { index, ip })
                }
                AddressFamily::Bridge => Some(KernelChange::FdbDeleted {
                    index,
                    mac: neighbour_mac(&neighbour)?,
                    dst: fdb_dst(&neighbour),
                }),
                _ => None,
            }
        }
        _ => None,
    }
}

fn neighbour_ip(message: &NeighbourMessage) -> Option<Ipv4Addr> {
    message
        .attributes
        .iter()
        .find_map(|attribute| match attribute {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
            _ => None,
        })
}

/// An FDB entry's NDA_DST. For AF_BRIDGE the crate cannot know its family: 4 bytes is IPv4.
fn fdb_dst(message: &NeighbourMessage) -> Option<Ipv4Addr> {
    message
        .attributes
        .iter()
        .find_map(|attribute| match attribute {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
            NeighbourAttribute::Destination(NeighbourAddress::Other(bytes)) => {
                <[u8; 4]>::try_from(bytes.as_slice())
                    .ok()
                    .map(Ipv4Addr::from)
            }
            _ => None,
        })
}

fn ignore_not_found(result: Result<(), NetlinkError>) -> Result<(), NetlinkError> {
    match result {
        Err(err) if err.is_not_found() => Ok(()),
        other => other,
    }
}

fn single_link(
    result: Result<Vec<LinkMessage>, rtnetlink::Error>,
    what: String,
) -> Result<Option<Link>, NetlinkError> {
    match result {
        Ok(messages) => Ok(messages.first().map(link_from_message)),
        Err(source) => {
            let err = NetlinkError::Request { what, source };
            if err.is_not_found() {
                Ok(None)
            } else {
                Err(err)
            }
        }
    }
}

/// NUD_PERMANENT may come with other bits (`bridge fdb add ... permanent` also sets NOARP).
fn is_permanent(state: NeighbourState) -> bool {
    const NUD_PERMANENT: u16 = 0x80;
    u16::from(state) & NUD_PERMANENT != 0
}

fn mac_from_bytes(bytes: &[u8]) -> Option<MacAddr6> {
    let array: [u8; 6] = bytes.try_into().ok()?;
    Some(MacAddr6::from(array))
}

fn neighbour_mac(message: &NeighbourMessage) -> Option<MacAddr6> {
    message
        .attributes
        .iter()
        .find_map(|attribute| match attribute {
            NeighbourAttribute::LinkLayerAddress(bytes) => mac_from_bytes(bytes),
            _ => None,
        })
}

fn link_from_message(message: &LinkMessage) -> Link {
    let mut link = Link {
        index: message.header.index,
        name: String::new(),
        mtu: 0,
        mac: None,
        up: message.header.flags.contains(LinkFlags::Up),
        kind: None,
        vxlan: None,
        master: None,
        peer_index: None,
        peer_netnsid: None,
    };
    for attribute in &message.attributes {
        match attribute {
            LinkAttribute::IfName(name) => link.name = name.clone(),
            LinkAttribute::Controller(index) => link.master = Some(*index),
            LinkAttribute::Link(index) => link.peer_index = Some(*index),
            LinkAttribute::LinkNetNsId(id) => link.peer_netnsid = Some(*id),
            LinkAttribute::Mtu(mtu) => link.mtu = *mtu,
            LinkAttribute::Address(bytes) => link.mac = mac_from_bytes(bytes),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    match info {
                        LinkInfo::Kind(kind) => link.kind = Some(kind.to_string()),
                        LinkInfo::Data(InfoData::Vxlan(data)) => {
                            link.vxlan = Some(vxlan_from_info(data))
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    if link.kind.as_deref() != Some(&InfoKind::Vxlan.to_string()) {
        link.vxlan = None;
    }
    link
}

fn vxlan_from_info(data: &[InfoVxlan]) -> VxlanInfo {
    let mut info = VxlanInfo {
        vni: 0,
        local: None,
        dev: None,
        port: 0,
        learning: false,
        gbp: false,
    };
    for item in data {
        match item {
            InfoVxlan::Id(vni) => info.vni = *vni,
            InfoVxlan::Local(ip) => info.local = Some(*ip),
            InfoVxlan::Link(dev) => info.dev = Some(*dev),
            InfoVxlan::Port(port) => info.port = *port,
            InfoVxlan::Learning(learning) => info.learning = *learning,
            InfoVxlan::Gbp => info.gbp = true,
            _ => {}
        }
    }
    info
}

fn route_table(message: &RouteMessage) -> u32 {
    message
        .attributes
        .iter()
        .find_map(|attribute| match attribute {
            RouteAttribute::Table(table) => Some(*table),
            _ => None,
        })
        .unwrap_or(u32::from(message.header.table))
}

fn route_from_message(message: &RouteMessage) -> Route {
    let mut destination = Ipv4Addr::UNSPECIFIED;
    let mut gateway = None;
    let mut oif = None;
    for attribute in &message.attributes {
        match attribute {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => destination = *ip,
            RouteAttribute::Gateway(RouteAddress::Inet(ip)) => gateway = Some(*ip),
            RouteAttribute::Oif(index) => oif = Some(*index),
            _ => {}
        }
    }
    Route {
        destination: Ipv4Network::new(destination, message.header.destination_prefix_length)
            .unwrap_or_else(|_| Ipv4Network::from(destination)),
        gateway,
        oif,
        onlink: message.header.flags.contains(RouteFlags::Onlink),
    }
}

fn nexthop_route_message(destination: Ipv4Network, id: u32) -> RouteMessage {
    let mut message = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(destination.network(), destination.prefix())
        .protocol(RouteProtocol::Boot)
        .scope(RouteScope::Universe)
        .build();
    message.attributes.push(RouteAttribute::NhId(id));
    message
}

fn route_message(route: &Route) -> RouteMessage {
    // proto boot, scope universe, table main, type unicast: what `ip route add` and
    // flannel (vishvananda/netlink's defaults) produce.
    let mut builder = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(route.destination.network(), route.destination.prefix())
        .protocol(RouteProtocol::Boot)
        .scope(RouteScope::Universe);
    if let Some(gateway) = route.gateway {
        builder = builder.gateway(gateway);
    } else {
        builder = builder.scope(RouteScope::Link);
    }
    if let Some(oif) = route.oif {
        builder = builder.output_interface(oif);
    }
    if route.onlink {
        builder = builder.onlink();
    }
    builder.build()
}
