//! The guest wall clock. A VM's clock lags by the time it was paused or
//! saved and never catches up, so the host's time is applied at boot and
//! again after every resume or restore.

/// Sets CLOCK_REALTIME to `unix_ms` (milliseconds since the epoch).
/// A value of 0 or less means "not given" and is ignored.
pub fn set_wall_clock(unix_ms: i64) -> Result<(), String> {
    if unix_ms <= 0 {
        return Ok(());
    }
    let ts = libc::timespec {
        tv_sec: unix_ms.div_euclid(1000),
        tv_nsec: unix_ms.rem_euclid(1000) * 1_000_000,
    };
    // SAFETY: ts is a valid timespec for the duration of the call.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } == 0 {
        Ok(())
    } else {
        Err(format!(
            "clock_settime: {}",
            std::io::Error::last_os_error()
        ))
    }
}

/// CLOCK_REALTIME now, in unix milliseconds.
pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Seconds since the guest kernel booted (CLOCK_BOOTTIME; needs no /proc).
pub fn uptime_secs() -> Option<f64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    (rc == 0).then(|| ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_is_ignored() {
        assert_eq!(set_wall_clock(0), Ok(()));
        assert_eq!(set_wall_clock(-5), Ok(()));
    }

    #[test]
    fn uptime_reads() {
        assert!(uptime_secs().is_some_and(|u| u > 0.0));
    }
}
