//! Machine-wide CPU time from /proc/stat, and one process's CPU time and peak RSS from
//! /proc/<pid>. "All CPU time on the machine" is what the datapath's cost per Gbit/s counts:
//! softirq work of encap/decap lands on whichever CPU took the packet.

use anyhow::{Context, Result, bail};

/// Clock ticks per second of /proc's tick counters.
fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

#[derive(Clone, Copy, Debug)]
pub struct CpuTimes {
    /// user + nice + system + irq + softirq + steal, in seconds, summed over CPUs.
    pub busy: f64,
    /// busy + idle + iowait.
    pub total: f64,
}

impl CpuTimes {
    pub fn now() -> Result<Self> {
        let stat = std::fs::read_to_string("/proc/stat").context("read /proc/stat")?;
        parse_proc_stat(&stat)
    }

    pub fn since(&self, earlier: &CpuTimes) -> CpuTimes {
        CpuTimes {
            busy: self.busy - earlier.busy,
            total: self.total - earlier.total,
        }
    }
}

pub fn parse_proc_stat(stat: &str) -> Result<CpuTimes> {
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("/proc/stat has no aggregate 'cpu ' line")?;
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse::<f64>())
        .collect::<Result<_, _>>()
        .context("/proc/stat 'cpu ' line has a non-numeric field")?;
    if v.len() < 8 {
        bail!(
            "/proc/stat 'cpu ' line has {} fields, expected >= 8",
            v.len()
        );
    }
    let tps = ticks_per_second();
    // user nice system idle iowait irq softirq steal [guest guest_nice: already in user/nice]
    let busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7];
    Ok(CpuTimes {
        busy: busy / tps,
        total: (busy + v[3] + v[4]) / tps,
    })
}

/// CPU seconds (user + system) a process has used so far.
pub fn process_cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("read /proc/{pid}/stat (process gone?)"))?;
    // Field 2 (comm) may contain spaces: split after its closing parenthesis.
    let rest = stat
        .rsplit_once(')')
        .with_context(|| format!("/proc/{pid}/stat has no ')'"))?
        .1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After comm: state(3) ... utime is field 14, stime 15 (1-based) -> index 11, 12 here.
    let utime: f64 = f.get(11).context("utime")?.parse()?;
    let stime: f64 = f.get(12).context("stime")?.parse()?;
    Ok((utime + stime) / ticks_per_second())
}

/// Peak resident set size (VmHWM) of a process, in bytes.
pub fn process_peak_rss(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status (process gone?)"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .with_context(|| format!("/proc/{pid}/status has no VmHWM"))?;
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .context("VmHWM value")?
        .parse()
        .context("VmHWM value")?;
    Ok(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_aggregate_line() {
        let t = parse_proc_stat("cpu  100 0 50 800 10 5 5 0 0 0\ncpu0 1 2 3 4 5 6 7 8\n")
            .expect("valid");
        let tps = ticks_per_second();
        assert!((t.busy - 160.0 / tps).abs() < 1e-9);
        assert!((t.total - 970.0 / tps).abs() < 1e-9);
        assert!(parse_proc_stat("intr 1 2\n").is_err());
    }

    #[test]
    fn reads_own_process() {
        let pid = std::process::id();
        assert!(process_cpu_seconds(pid).expect("own stat") >= 0.0);
        assert!(process_peak_rss(pid).expect("own status") > 0);
    }
}
