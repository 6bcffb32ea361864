//! Logging setup: `LOG_LEVEL` picks the level; trace, debug and info go to stdout, warn and
//! error to stderr (as Metamorphosis does); `LOG_FORMAT` picks text or one JSON object per line.

use std::str::FromStr;

use tracing::Level;
use tracing_subscriber::fmt::writer::MakeWriterExt;

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl FromStr for LogFormat {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        match s.to_ascii_lowercase().as_str() {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            _ => Err(()),
        }
    }
}

/// Level and format of the bridge's logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogConfig {
    pub level: Level,
    pub format: LogFormat,
}

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("a global logger is already installed")]
    AlreadyInstalled,
}

/// Parses a `LOG_LEVEL` value: trace, debug, info, warn (or warning), error; any case.
pub fn parse_level(value: &str) -> Option<Level> {
    match value.to_ascii_lowercase().as_str() {
        "trace" => Some(Level::TRACE),
        "debug" => Some(Level::DEBUG),
        "info" => Some(Level::INFO),
        "warn" | "warning" => Some(Level::WARN),
        "error" => Some(Level::ERROR),
        _ => None,
    }
}

/// Installs the process-wide logger. Call once, from the binary.
pub fn init(config: LogConfig) -> Result<(), LogError> {
    // Records at WARN or above (more severe) go to stderr, the rest to stdout.
    let writer = std::io::stderr
        .with_max_level(Level::WARN)
        .or_else(std::io::stdout);
    let builder = tracing_subscriber::fmt()
        .with_max_level(config.level)
        .with_writer(writer)
        .with_target(false);
    let installed = match config.format {
        LogFormat::Text => builder.with_ansi(false).try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    installed.map_err(|_| LogError::AlreadyInstalled)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse_in_any_case() {
        assert_eq!(parse_level("TRACE"), Some(Level::TRACE));
        assert_eq!(parse_level("Warn"), Some(Level::WARN));
        assert_eq!(parse_level("warning"), Some(Level::WARN));
        assert_eq!(parse_level("verbose"), None);
        assert_eq!("JSON".parse(), Ok(LogFormat::Json));
        assert_eq!("xml".parse::<LogFormat>(), Err(()));
    }
}
