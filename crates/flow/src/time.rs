//! Time: kernel timestamps to wall time, RFC3339 with nanoseconds, hubble-style durations.
//!
//! Everything is UTC (Hubble prints UTC too); no time-zone database is read.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::time::{clock_gettime, ClockId};

const NANOS_PER_SEC: i128 = 1_000_000_000;

/// Turns `bpf_ktime_get_ns()` stamps (CLOCK_MONOTONIC) into wall time, through the offset
/// between CLOCK_REALTIME and CLOCK_MONOTONIC captured once.
///
/// The offset drifts when the wall clock is stepped or slewed (NTP); an agent may capture a
/// new one now and then.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootClock {
    /// Realtime minus monotonic, in nanoseconds.
    offset_ns: i128,
}

impl BootClock {
    /// Reads CLOCK_MONOTONIC, the wall clock and CLOCK_MONOTONIC again, and keeps the offset
    /// against the midpoint of the two monotonic reads.
    pub fn capture() -> Result<Self, nix::Error> {
        let mono = || -> Result<i128, nix::Error> {
            let t = clock_gettime(ClockId::CLOCK_MONOTONIC)?;
            Ok(i128::from(t.tv_sec()) * NANOS_PER_SEC + i128::from(t.tv_nsec()))
        };
        let before = mono()?;
        let real = unix_nanos(SystemTime::now());
        let after = mono()?;
        Ok(BootClock {
            offset_ns: real - i128::midpoint(before, after),
        })
    }

    /// A clock with a known offset (realtime − monotonic, nanoseconds): for tests and replay.
    pub fn with_offset_ns(offset_ns: i128) -> Self {
        BootClock { offset_ns }
    }

    pub fn offset_ns(&self) -> i128 {
        self.offset_ns
    }

    /// The wall time of a CLOCK_MONOTONIC stamp.
    pub fn wall_time(&self, ktime_ns: u64) -> SystemTime {
        from_unix_nanos(i128::from(ktime_ns) + self.offset_ns)
    }
}

/// Nanoseconds since the Unix epoch (negative before it).
pub fn unix_nanos(t: SystemTime) -> i128 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i128::try_from(d.as_nanos()).unwrap_or(i128::MAX),
        Err(e) => -i128::try_from(e.duration().as_nanos()).unwrap_or(i128::MAX),
    }
}

/// The time `nanos` nanoseconds after the Unix epoch (before it if negative), saturating at
/// what `SystemTime` can hold.
pub fn from_unix_nanos(nanos: i128) -> SystemTime {
    let dur = |n: u128| {
        let secs = u64::try_from(n / 1_000_000_000).unwrap_or(u64::MAX);
        Duration::new(secs, (n % 1_000_000_000) as u32)
    };
    if nanos >= 0 {
        let d = dur(nanos.unsigned_abs());
        UNIX_EPOCH.checked_add(d).unwrap_or(UNIX_EPOCH)
    } else {
        let d = dur(nanos.unsigned_abs());
        UNIX_EPOCH.checked_sub(d).unwrap_or(UNIX_EPOCH)
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day count since 1970-01-01: (year, month 1..=12, day 1..=31).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let m = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Broken-down UTC time.
struct Civil {
    year: i64,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
    nanos: u32,
}

fn civil(t: SystemTime) -> Civil {
    let n = unix_nanos(t);
    let secs = n.div_euclid(NANOS_PER_SEC);
    let nanos = n.rem_euclid(NANOS_PER_SEC) as u32;
    let days = i64::try_from(secs.div_euclid(86_400)).unwrap_or(i64::MAX / 2);
    let sod = secs.rem_euclid(86_400) as u32;
    let (year, month, day) = civil_from_days(days);
    Civil {
        year,
        month,
        day,
        hour: sod / 3600,
        minute: sod / 60 % 60,
        second: sod % 60,
        nanos,
    }
}

/// RFC3339 in UTC with nanoseconds: `2026-11-22T01:02:03.456789012Z`.
pub fn format_rfc3339(t: SystemTime) -> String {
    let c = civil(t);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:09}Z",
        c.year, c.month, c.day, c.hour, c.minute, c.second, c.nanos
    )
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// Hubble's compact stamp (Go's `StampMilli`), UTC: `Nov 22 01:02:03.456`.
pub fn format_stamp_milli(t: SystemTime) -> String {
    let c = civil(t);
    let month = MONTHS
        .get(c.month.saturating_sub(1) as usize)
        .copied()
        .unwrap_or("???");
    format!(
        "{month} {:>2} {:02}:{:02}:{:02}.{:03}",
        c.day,
        c.hour,
        c.minute,
        c.second,
        c.nanos / 1_000_000
    )
}

/// Parses RFC3339: `2026-11-22T01:02:03Z`, with an optional fraction (up to nanoseconds) and a
/// `Z` or `±hh:mm` offset; `t`/`z` in lower case and a space for `T` are accepted.
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if b.len() < 20 {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        let part = s.get(r)?;
        if !part.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        part.parse().ok()
    };
    let year = num(0..4)?;
    let month = num(5..7)?;
    let day = num(8..10)?;
    let hour = num(11..13)?;
    let minute = num(14..16)?;
    let second = num(17..19)?;
    if b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    if !(1..=12).contains(&month) || day == 0 || day > days_in_month(i64::from(year), month) {
        return None;
    }
    // 60 is a leap second, folded into the next minute's 0 as most parsers do.
    if hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let mut i = 19;
    let mut nanos: u32 = 0;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        let digits = &s[start..i];
        if digits.is_empty() {
            return None;
        }
        // Nanosecond precision; finer digits are dropped.
        let kept: String = digits.chars().take(9).collect();
        let scale = 10u32.pow(9 - kept.len() as u32);
        nanos = kept.parse::<u32>().ok()? * scale;
    }
    let offset_secs: i64 = match b.get(i) {
        Some(b'Z' | b'z') if i + 1 == b.len() => 0,
        Some(&sign @ (b'+' | b'-')) if i + 6 == b.len() && b[i + 3] == b':' => {
            let oh = i64::from(num(i + 1..i + 3)?);
            let om = i64::from(num(i + 4..i + 6)?);
            if oh > 23 || om > 59 {
                return None;
            }
            let off = oh * 3600 + om * 60;
            if sign == b'+' {
                off
            } else {
                -off
            }
        }
        _ => return None,
    };
    let days = days_from_civil(i64::from(year), month, day);
    let secs = days * 86_400 + i64::from(hour) * 3600 + i64::from(minute) * 60 + i64::from(second)
        - offset_secs;
    Some(from_unix_nanos(
        i128::from(secs) * NANOS_PER_SEC + i128::from(nanos),
    ))
}

fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        _ => 28,
    }
}

/// Parses a duration as Go (and so Hubble) writes them: `30s`, `5m`, `1h30m`, `1.5h`,
/// `250ms`; units `ns`, `us`/`µs`, `ms`, `s`, `m`, `h`, and `d` for days.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let mut total: f64 = 0.0;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return None;
        }
        let value: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "d" => 86_400.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += value * unit;
    }
    Duration::try_from_secs_f64(total).ok()
}

/// `--since`/`--until`: a duration back from `now` (`5m`, `30s`) or an RFC3339 time.
pub fn parse_since(s: &str, now: SystemTime) -> Option<SystemTime> {
    if let Some(t) = parse_rfc3339(s) {
        return Some(t);
    }
    let d = parse_duration(s)?;
    Some(now.checked_sub(d).unwrap_or(UNIX_EPOCH))
}

/// Serde for a `SystemTime` as an RFC3339 string.
pub mod rfc3339 {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_rfc3339(*t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let s = String::deserialize(d)?;
        super::parse_rfc3339(&s)
            .ok_or_else(|| serde::de::Error::custom(format!("not an RFC3339 time: {s:?}")))
    }
}

/// Serde for an `Option<SystemTime>` as an RFC3339 string or null.
pub mod rfc3339_opt {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer};

    #[allow(clippy::ref_option)] // serde's `with` passes `&Option<T>`.
    pub fn serialize<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.serialize_str(&super::format_rfc3339(*t)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SystemTime>, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(None),
            Some(s) => super::parse_rfc3339(&s)
                .map(Some)
                .ok_or_else(|| serde::de::Error::custom(format!("not an RFC3339 time: {s:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trip() {
        let t = from_unix_nanos(1_795_309_323_456_789_012);
        let s = format_rfc3339(t);
        assert_eq!(s, "2026-11-22T01:02:03.456789012Z");
        assert_eq!(parse_rfc3339(&s), Some(t));
        assert_eq!(format_stamp_milli(t), "Nov 22 01:02:03.456");
    }

    #[test]
    fn rfc3339_variants() {
        let base = parse_rfc3339("2024-02-29T23:59:59Z").unwrap();
        assert_eq!(format_rfc3339(base), "2024-02-29T23:59:59.000000000Z");
        assert_eq!(parse_rfc3339("2024-03-01T01:59:59+02:00"), Some(base));
        assert_eq!(parse_rfc3339("2024-02-29t21:59:59-02:00"), Some(base));
        assert_eq!(
            parse_rfc3339("2024-02-29T23:59:59.5Z").map(unix_nanos),
            Some(unix_nanos(base) + 500_000_000)
        );
        assert_eq!(
            parse_rfc3339("1969-12-31T23:59:59Z").map(unix_nanos),
            Some(-NANOS_PER_SEC)
        );
        assert_eq!(
            format_rfc3339(from_unix_nanos(-1)),
            "1969-12-31T23:59:59.999999999Z"
        );
        for bad in [
            "2023-02-29T00:00:00Z",
            "2024-13-01T00:00:00Z",
            "2024-01-01T24:00:00Z",
            "2024-01-01T00:00:00",
            "2024-01-01T00:00:00.Z",
            "2024-01-01T00:00:00+0200",
            "yesterday",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
        assert_eq!(format_stamp_milli(base), "Feb 29 23:59:59.000");
        let early = parse_rfc3339("2024-03-05T00:00:00Z").unwrap();
        assert_eq!(format_stamp_milli(early), "Mar  5 00:00:00.000");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1.5h"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("2d"), Some(Duration::from_secs(172_800)));
        assert_eq!(parse_duration("0"), Some(Duration::ZERO));
        for bad in ["", "5", "m", "5x", "-5m", "5m3"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
        let now = parse_rfc3339("2026-11-22T01:00:00Z").unwrap();
        assert_eq!(
            parse_since("5m", now),
            parse_rfc3339("2026-11-22T00:55:00Z")
        );
        assert_eq!(
            parse_since("2026-11-21T00:00:00Z", now),
            parse_rfc3339("2026-11-21T00:00:00Z")
        );
        assert_eq!(parse_since("soon", now), None);
    }

    #[test]
    fn boot_clock() {
        let c = BootClock::with_offset_ns(1_000_000_000_000_000_000);
        assert_eq!(unix_nanos(c.wall_time(5)), 1_000_000_000_000_000_005);
        let live = BootClock::capture().unwrap();
        let mono = clock_gettime(ClockId::CLOCK_MONOTONIC).unwrap();
        let k = u64::try_from(mono.tv_sec()).unwrap() * 1_000_000_000
            + u64::try_from(mono.tv_nsec()).unwrap();
        let skew = unix_nanos(SystemTime::now()) - unix_nanos(live.wall_time(k));
        assert!(skew.abs() < 1_000_000_000, "skew {skew}");
    }
}
