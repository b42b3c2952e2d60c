//! The BPF maps the agent writes and reads: typed handles, counters, map error helpers.

use super::*;

/// A delete of a key that is not there is success (mark-and-sweep re-applies deletes).
pub(super) fn absent_ok(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(err)) if err.io_error.raw_os_error() == Some(libc::ENOENT) => {
            Ok(())
        }
        other => other,
    }
}

pub(super) fn map_err(
    what: impl Into<String>,
    map: &'static str,
) -> impl FnOnce(MapError) -> EbpfError {
    let what = what.into();
    move |source| EbpfError::Map {
        what,
        map,
        source: Box::new(source),
    }
}

/// Sums the per-CPU counters of the STATS map.
pub(super) fn sum_stats(
    stats: &PerCpuArray<MapData, u64>,
) -> Result<[u64; stat::COUNT as usize], EbpfError> {
    let mut totals = [0u64; stat::COUNT as usize];
    for (index, total) in totals.iter_mut().enumerate() {
        let values = stats
            .get(&(index as u32), 0)
            .map_err(map_err("reading counters", map_names::STATS))?;
        *total = values.iter().sum();
    }
    Ok(totals)
}

/// Counters by name (`overlay_common::stat::NAMES`), as `AgentStatus::datapath_counters`
/// holds them.
pub fn counters_by_name(
    stats: &[u64; stat::COUNT as usize],
) -> std::collections::BTreeMap<String, u64> {
    stat::NAMES
        .iter()
        .zip(stats)
        .map(|(name, value)| ((*name).to_owned(), *value))
        .collect()
}

/// Reads the counters from the pinned STATS map: works while the agent is down (`status`).
pub fn read_pinned_stats(pin_dir: &Path) -> Result<[u64; stat::COUNT as usize], EbpfError> {
    let path = pin_dir.join(map_names::STATS);
    let data = MapData::from_pin(&path).map_err(map_err(
        format!(
            "opening {} (is the eBPF datapath installed?)",
            path.display()
        ),
        map_names::STATS,
    ))?;
    let map = Map::from_map_data(data).map_err(map_err("opening", map_names::STATS))?;
    let stats = PerCpuArray::try_from(map).map_err(map_err("opening", map_names::STATS))?;
    sum_stats(&stats)
}

pub(super) struct Maps {
    pub(super) peers: LpmTrie<MapData, PeerSubnet, PeerInfo>,
    pub(super) sources: HashMap<MapData, [u8; 4], PeerSource>,
    pub(super) config: Array<MapData, DatapathConfig>,
    pub(super) stats: PerCpuArray<MapData, u64>,
    pub(super) endpoints: HashMap<MapData, [u8; 4], Endpoint>,
    pub(super) flows: HashMap<MapData, FlowKey, FlowState>,
}

impl Maps {
    pub(super) fn take(ebpf: &mut Ebpf) -> Result<Self, EbpfError> {
        fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<Map, EbpfError> {
            ebpf.take_map(name).ok_or(EbpfError::MissingMap(name))
        }
        Ok(Self {
            peers: LpmTrie::try_from(take(ebpf, map_names::PEERS)?)
                .map_err(map_err("opening", map_names::PEERS))?,
            sources: HashMap::try_from(take(ebpf, map_names::PEER_SOURCES)?)
                .map_err(map_err("opening", map_names::PEER_SOURCES))?,
            config: Array::try_from(take(ebpf, map_names::CONFIG)?)
                .map_err(map_err("opening", map_names::CONFIG))?,
            stats: PerCpuArray::try_from(take(ebpf, map_names::STATS)?)
                .map_err(map_err("opening", map_names::STATS))?,
            endpoints: HashMap::try_from(take(ebpf, map_names::ENDPOINTS)?)
                .map_err(map_err("opening", map_names::ENDPOINTS))?,
            flows: HashMap::try_from(take(ebpf, map_names::FLOWS)?)
                .map_err(map_err("opening", map_names::FLOWS))?,
        })
    }
}
