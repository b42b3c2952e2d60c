//! The maps, pinned by name (the agent loads with a pin path, so they survive restarts).
//! Names are string literals because the `map` macro needs one; they must equal
//! `overlay_common::map_names` (the agent looks them up by those constants and fails loudly).

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
};
use overlay_common::{
    DatapathConfig, Endpoint, FlowKey, FlowState, MAX_ENDPOINTS, MAX_FLOWS, MAX_PEERS, PeerInfo,
    PeerSource, PeerSubnet, stat,
};

#[map(name = "OVL_PEERS")]
pub static PEERS: LpmTrie<PeerSubnet, PeerInfo> = LpmTrie::pinned(MAX_PEERS, 0);

#[map(name = "OVL_PEER_SRCS")]
pub static PEER_SOURCES: HashMap<[u8; 4], PeerSource> = HashMap::pinned(MAX_PEERS, 0);

#[map(name = "OVL_CONFIG")]
pub static CONFIG: Array<DatapathConfig> = Array::pinned(1, 0);

#[map(name = "OVL_STATS")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::pinned(stat::COUNT, 0);

#[map(name = "OVL_ENDPOINTS")]
pub static ENDPOINTS: HashMap<[u8; 4], Endpoint> = HashMap::pinned(MAX_ENDPOINTS, 0);

#[map(name = "OVL_FLOWS")]
pub static FLOWS: LruHashMap<FlowKey, FlowState> = LruHashMap::pinned(MAX_FLOWS, 0);

/// The datapath configuration, or `None` while the agent has not written a complete one.
#[inline(always)]
pub fn config() -> Option<&'static DatapathConfig> {
    let cfg = CONFIG.get(0)?;
    if cfg.enabled == 0 { None } else { Some(cfg) }
}
