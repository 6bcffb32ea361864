//! The value parsers: each takes a variable's (trimmed) value and the variable's name, and
//! returns the typed value or a [`ConfigError`] naming both and saying what is expected.

use std::net::IpAddr;
use std::time::Duration;

use mkb_bridge::QoS;
use mkb_kafka::FullPolicy;
use mkb_log::LogFormat;
use mkb_mqtt::{AckMode, MqttVersion};

use super::ConfigError;

pub(super) fn host(value: &str, var: &'static str) -> Result<String, ConfigError> {
    let valid = !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '[' | ']'));
    accept(valid, value, var, "a host name or IP address")
}

/// `value` itself when `valid`, else the error saying what was expected.
fn accept(
    valid: bool,
    value: &str,
    var: &'static str,
    expected: &str,
) -> Result<String, ConfigError> {
    if valid {
        Ok(value.to_owned())
    } else {
        Err(ConfigError::invalid(var, value, expected))
    }
}

pub(super) fn port(value: &str, var: &'static str) -> Result<u16, ConfigError> {
    match value.parse::<u16>() {
        Ok(port) if port > 0 => Ok(port),
        _ => Err(ConfigError::invalid(
            var,
            value,
            "a port number from 1 to 65535",
        )),
    }
}

pub(super) fn number<T>(value: &str, var: &'static str, min: T, max: T) -> Result<T, ConfigError>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy,
{
    match value.parse::<T>() {
        Ok(n) if n >= min && n <= max => Ok(n),
        _ => Err(ConfigError::invalid(
            var,
            value,
            format!("a whole number from {min} to {max}"),
        )),
    }
}

pub(super) fn boolean(value: &str, var: &'static str) -> Result<bool, ConfigError> {
    match value.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(ConfigError::invalid(var, value, "true or false")),
    }
}

/// Parses a byte size: `1048576`, `512KiB`, `64MiB`, `1GiB` (binary units; `KB`, `MB`, `GB`
/// and `K`, `M`, `G` mean the same here).
pub fn parse_bytes(value: &str) -> Option<usize> {
    let value = value.trim();
    let split = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (digits, unit) = value.split_at(split);
    let n: usize = digits.parse().ok()?;
    let multiplier: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(multiplier)
}

/// The largest packet MQTT can encode (its remaining length tops out at 256 MiB - 1).
pub(super) const MQTT_LARGEST_PACKET: usize = 268_435_455;

pub(super) fn byte_size(value: &str, var: &'static str) -> Result<usize, ConfigError> {
    parse_bytes(value).ok_or_else(|| {
        ConfigError::invalid(
            var,
            value,
            "a size in bytes such as 1048576, 512KiB, 64MiB or 1GiB",
        )
    })
}

/// Parses `5` (seconds, as Metamorphosis), `5s`, `250ms`, `2m` or `1h`.
pub fn parse_duration(value: &str) -> Option<Duration> {
    let value = value.trim();
    let split = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (digits, unit) = value.split_at(split);
    let n: u64 = digits.parse().ok()?;
    match unit.trim() {
        "" | "s" => Some(Duration::from_secs(n)),
        "ms" => Some(Duration::from_millis(n)),
        "m" => n.checked_mul(60).map(Duration::from_secs),
        "h" => n.checked_mul(3600).map(Duration::from_secs),
        _ => None,
    }
}

const DURATION_EXPECTED: &str = "a duration such as 5 (seconds), 5s, 250ms or 2m";

pub(super) fn duration(value: &str, var: &'static str) -> Result<Duration, ConfigError> {
    parse_duration(value).ok_or_else(|| ConfigError::invalid(var, value, DURATION_EXPECTED))
}

pub(super) fn positive_duration(value: &str, var: &'static str) -> Result<Duration, ConfigError> {
    match parse_duration(value) {
        Some(d) if !d.is_zero() => Ok(d),
        _ => Err(ConfigError::invalid(
            var,
            value,
            format!("{DURATION_EXPECTED}, above zero"),
        )),
    }
}

/// Splits and checks `MQTT_TOPIC`: each filter non-empty, `#` only last and alone in its level,
/// `+` alone in its level, and `$share/group/filter` with a group and a filter.
pub(super) fn topic_filters(value: &str, var: &'static str) -> Result<Vec<String>, ConfigError> {
    let filters: Vec<String> = value
        .split(',')
        .map(str::trim)
        .filter(|f| !f.is_empty())
        .map(str::to_owned)
        .collect();
    if filters.is_empty() {
        return Err(ConfigError::invalid(
            var,
            value,
            "at least one topic filter",
        ));
    }
    for filter in &filters {
        if let Err(why) = check_filter(filter) {
            return Err(ConfigError::invalid(
                var,
                value,
                format!("valid topic filters ({filter:?}: {why})"),
            ));
        }
    }
    Ok(filters)
}

fn check_filter(filter: &str) -> Result<(), &'static str> {
    let filter = match filter.strip_prefix("$share/") {
        Some(rest) => {
            let (group, inner) = rest
                .split_once('/')
                .ok_or("$share needs a group and a filter")?;
            if group.is_empty() || group.contains(['+', '#']) {
                return Err("$share group must be a non-empty name without wildcards");
            }
            inner
        }
        None => filter,
    };
    if filter.is_empty() {
        return Err("empty filter");
    }
    if filter.contains('\0') {
        return Err("NUL character");
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i != levels.len() - 1) {
            return Err("# must be the whole last level");
        }
        if level.contains('+') && *level != "+" {
            return Err("+ must be a whole level");
        }
    }
    Ok(())
}

/// Kafka topic names: 1 to 249 characters of ASCII letters, digits, `.`, `_` and `-`.
pub(super) fn kafka_topic(value: &str, var: &'static str) -> Result<String, ConfigError> {
    let valid = !value.is_empty()
        && value.len() <= 249
        && value != "."
        && value != ".."
        && value.chars().all(mkb_bridge::route::is_topic_char);
    accept(
        valid,
        value,
        var,
        "a Kafka topic name: 1 to 249 of a-z A-Z 0-9 . _ -",
    )
}

pub(super) fn broker_list(value: &str, var: &'static str) -> Result<String, ConfigError> {
    let brokers: Vec<&str> = value
        .split(',')
        .map(str::trim)
        .filter(|b| !b.is_empty())
        .collect();
    let valid = !brokers.is_empty()
        && brokers.iter().all(|b| {
            b.rsplit_once(':').is_some_and(|(host_part, port_part)| {
                host(host_part, var).is_ok() && port(port_part, var).is_ok()
            })
        });
    if valid {
        Ok(brokers.join(","))
    } else {
        Err(ConfigError::invalid(
            var,
            value,
            "a comma-separated list of host:port",
        ))
    }
}

pub(super) fn log_level(value: &str, var: &'static str) -> Result<tracing::Level, ConfigError> {
    mkb_log::parse_level(value)
        .ok_or_else(|| ConfigError::invalid(var, value, "trace, debug, info, warn or error"))
}

pub(super) fn log_format(value: &str, var: &'static str) -> Result<LogFormat, ConfigError> {
    value
        .parse::<LogFormat>()
        .map_err(|()| ConfigError::invalid(var, value, "text or json"))
}

pub(super) fn mqtt_version(value: &str, var: &'static str) -> Result<MqttVersion, ConfigError> {
    match value {
        "3.1.1" | "311" | "3" | "4" => Ok(MqttVersion::V311),
        "5" | "5.0" => Ok(MqttVersion::V5),
        _ => Err(ConfigError::invalid(var, value, "3.1.1 or 5")),
    }
}

pub(super) fn qos(value: &str, var: &'static str) -> Result<QoS, ConfigError> {
    value
        .parse::<u8>()
        .ok()
        .and_then(QoS::from_level)
        .ok_or_else(|| ConfigError::invalid(var, value, "0, 1 or 2"))
}

pub(super) fn ack_mode(value: &str, var: &'static str) -> Result<AckMode, ConfigError> {
    match value {
        "after-write" => Ok(AckMode::AfterWrite),
        "on-receipt" => Ok(AckMode::OnReceipt),
        _ => Err(ConfigError::invalid(
            var,
            value,
            "after-write or on-receipt",
        )),
    }
}

/// An MQTT packet size: 1 KiB up to MQTT's largest packet.
pub(super) fn packet_size(value: &str, var: &'static str) -> Result<usize, ConfigError> {
    match byte_size(value, var)? {
        size @ 1024..=MQTT_LARGEST_PACKET => Ok(size),
        _ => Err(ConfigError::invalid(
            var,
            value,
            "a size from 1KiB to 256MiB (268435455 bytes, MQTT's largest packet)",
        )),
    }
}

/// A keep-alive interval MQTT can express: 1 s to 65,535 s.
pub(super) fn keep_alive(value: &str, var: &'static str) -> Result<Duration, ConfigError> {
    match duration(value, var)? {
        d if d >= Duration::from_secs(1) && d <= Duration::from_secs(65535) => Ok(d),
        _ => Err(ConfigError::invalid(
            var,
            value,
            "a duration from 1s to 65535s",
        )),
    }
}

/// A replication factor, or -1 for the broker's default.
pub(super) fn replication(value: &str, var: &'static str) -> Result<i32, ConfigError> {
    match value.parse::<i32>() {
        Ok(n) if n == -1 || (1..=32).contains(&n) => Ok(n),
        _ => Err(ConfigError::invalid(
            var,
            value,
            "-1 (broker default) or a replication factor from 1 to 32",
        )),
    }
}

pub(super) fn full_policy(value: &str, var: &'static str) -> Result<FullPolicy, ConfigError> {
    match value {
        "block" => Ok(FullPolicy::Block),
        "drop-oldest" => Ok(FullPolicy::DropOldest),
        "drop-newest" => Ok(FullPolicy::DropNewest),
        _ => Err(ConfigError::invalid(
            var,
            value,
            "block, drop-oldest or drop-newest",
        )),
    }
}

pub(super) fn ip_address(value: &str, var: &'static str) -> Result<IpAddr, ConfigError> {
    value
        .parse()
        .map_err(|_| ConfigError::invalid(var, value, "an IPv4 or IPv6 address"))
}

/// A port to listen on: 0 picks a free one.
pub(super) fn listen_port(value: &str, var: &'static str) -> Result<u16, ConfigError> {
    value
        .parse::<u16>()
        .map_err(|_| ConfigError::invalid(var, value, "a port number from 0 to 65535"))
}
