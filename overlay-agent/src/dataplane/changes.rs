//! The kernel's change notifications, as the dataplanes consume them: one netlink
//! subscription per dataplane stack, each notification parsed once and handed only to the
//! parts that asked for its kind (the vxlan kernel repairs deletions; the eBPF dataplane on
//! top of it follows underlay routes).

use std::sync::{Arc, Mutex, Weak};

use futures_util::{Stream, StreamExt};
use tokio::sync::mpsc;
use tracing::warn;

use crate::os::netlink::{KernelChange, Membership, Netlink};

/// Which notifications a subscriber wants; decided in the subscription task, so a kind
/// nobody looks at never wakes anyone (vxlan's repairs need no route additions, say).
pub type Interest = fn(&KernelChange) -> bool;

struct Subscriber {
    wants: Interest,
    sender: mpsc::UnboundedSender<KernelChange>,
}

type Subscribers = Mutex<Vec<Subscriber>>;

/// One subscription to the link, neighbour and IPv4 route groups, shared by subscribers.
/// The tasks behind it end once the feed and every subscriber are gone.
///
/// A feed made with [`ChangeFeed::start_unjoined`] hears nothing until [`ChangeFeed::join`]:
/// a dataplane's first sync then is not told of each of its own writes. Joining hands every
/// subscriber a [`KernelChange::Overrun`], so each checks everything once: nothing that
/// changed before the join goes unseen.
#[derive(Clone)]
pub struct ChangeFeed {
    /// None when the subscription could not be made: subscribers then get no notifications
    /// and fall back to full checks.
    subscribers: Option<Arc<Subscribers>>,
    memberships: Arc<Mutex<Memberships>>,
}

/// The sockets' group memberships: joined, or waiting for [`ChangeFeed::join`].
#[derive(Default)]
struct Memberships {
    joined: bool,
    waiting: Vec<Membership>,
}

impl std::fmt::Debug for ChangeFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChangeFeed")
            .field("live", &self.subscribers.is_some())
            .field("joined", &self.joined())
            .finish()
    }
}

impl ChangeFeed {
    /// Subscribes to the kernel's notifications in the current network namespace. Needs a
    /// tokio runtime. A failure is logged, not returned: the dataplanes work without
    /// notifications, checking everything instead.
    pub fn start() -> Self {
        let feed = Self::start_unjoined();
        feed.join();
        feed
    }

    /// As [`ChangeFeed::start`], but the notifications start at [`ChangeFeed::join`].
    pub fn start_unjoined() -> Self {
        let (changes, membership) = match Netlink::kernel_changes() {
            Ok(subscription) => subscription,
            Err(err) => {
                warn!(error = %err, "cannot subscribe to netlink change notifications; checking all datapath state every second instead");
                return Self {
                    subscribers: None,
                    memberships: Arc::default(),
                };
            }
        };
        let feed = Self {
            subscribers: Some(Arc::default()),
            memberships: Arc::default(),
        };
        feed.add_source(changes, membership);
        feed
    }

    /// Whether notifications flow (the feed joined its groups).
    pub fn joined(&self) -> bool {
        self.memberships.lock().expect("membership lock").joined
    }

    /// Starts the notifications (once; later calls do nothing) and asks every subscriber
    /// for one full check, for whatever changed before.
    pub fn join(&self) {
        let mut memberships = self.memberships.lock().expect("membership lock");
        if memberships.joined {
            return;
        }
        memberships.joined = true;
        let mut failed = None;
        for membership in memberships.waiting.drain(..) {
            if let Err(err) = membership.join() {
                failed = Some(err);
                break;
            }
        }
        drop(memberships);
        let Some(subscribers) = &self.subscribers else {
            return;
        };
        let mut subscribers = subscribers.lock().expect("subscriber list lock");
        for subscriber in subscribers.iter() {
            let _ = subscriber.sender.send(KernelChange::Overrun);
        }
        if let Some(err) = failed {
            // As when the socket fails: the receivers see the end and check fully each time.
            warn!(error = %err, "cannot join the netlink change groups; checking all datapath state every second instead");
            subscribers.clear();
        }
    }

    /// Hands the changes of one more socket to the same subscribers (nexthop deletions,
    /// which come on a socket of their own); its groups are joined with the feed's.
    pub fn add_source(
        &self,
        changes: impl Stream<Item = KernelChange> + Send + 'static,
        membership: Membership,
    ) {
        let Some(subscribers) = &self.subscribers else {
            return;
        };
        {
            let mut memberships = self.memberships.lock().expect("membership lock");
            if !memberships.joined {
                memberships.waiting.push(membership);
            } else if let Err(err) = membership.join() {
                warn!(error = %err, "cannot join a netlink change group; a full check catches what it would tell");
            }
        }
        let weak: Weak<Subscribers> = Arc::downgrade(subscribers);
        tokio::spawn(async move {
            let mut changes = std::pin::pin!(changes);
            while let Some(change) = changes.next().await {
                let Some(shared) = weak.upgrade() else {
                    return;
                };
                shared
                    .lock()
                    .expect("subscriber list lock")
                    .retain(|s| !(s.wants)(&change) || s.sender.send(change.clone()).is_ok());
            }
            // The socket failed: one last full check for everyone, then the receivers see
            // the end and fall back to full checks.
            if let Some(shared) = weak.upgrade() {
                for subscriber in shared.lock().expect("subscriber list lock").drain(..) {
                    let _ = subscriber.sender.send(KernelChange::Overrun);
                }
            }
        });
    }

    /// A receiver of the notifications `wants` selects, from now on.
    pub fn subscribe(&self, wants: Interest) -> Changes {
        let Some(subscribers) = &self.subscribers else {
            return Changes {
                receiver: None,
                pending: Vec::new(),
                _feed: None,
            };
        };
        let (sender, receiver) = mpsc::unbounded_channel();
        subscribers
            .lock()
            .expect("subscriber list lock")
            .push(Subscriber { wants, sender });
        Changes {
            receiver: Some(receiver),
            pending: Vec::new(),
            _feed: Some(Arc::clone(subscribers)),
        }
    }
}

/// One subscriber's notifications: those received and not yet taken, and whether more can
/// come.
pub struct Changes {
    /// None once the subscription failed or broke: then every check must be a full one.
    receiver: Option<mpsc::UnboundedReceiver<KernelChange>>,
    pending: Vec<KernelChange>,
    /// Keeps the feed's tasks running while this subscriber lives.
    _feed: Option<Arc<Subscribers>>,
}

impl std::fmt::Debug for Changes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Changes")
            .field("live", &self.live())
            .field("pending", &self.pending.len())
            .finish()
    }
}

impl Changes {
    /// Whether notifications still arrive (if not, the owner checks everything each time).
    pub fn live(&self) -> bool {
        self.receiver.is_some()
    }

    /// Waits for the next notification and keeps it. Cancel-safe; never resolves once the
    /// subscription is gone (the owner's periodic full check takes over).
    pub async fn changed(&mut self) {
        let Some(receiver) = &mut self.receiver else {
            return std::future::pending().await;
        };
        match receiver.recv().await {
            Some(change) => self.pending.push(change),
            None => self.stopped(),
        }
    }

    /// Everything received so far, without waiting.
    pub fn take(&mut self) -> Vec<KernelChange> {
        while let Some(receiver) = &mut self.receiver {
            match receiver.try_recv() {
                Ok(change) => self.pending.push(change),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => self.stopped(),
            }
        }
        std::mem::take(&mut self.pending)
    }

    fn stopped(&mut self) {
        warn!(
            "netlink change notifications stopped; checking all datapath state every second instead"
        );
        self.receiver = None;
    }
}
