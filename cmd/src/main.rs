//! The `mqtt-kafka-bridge` binary: parses flags and configuration, installs logging, runs the
//! bridge until SIGINT or SIGTERM, and maps the outcome to an exit status
//! (0 clean stop, 64 bad configuration, 1 anything else).

use std::process::ExitCode;

use mqtt_kafka_bridge::config;

/// jemalloc, not glibc's malloc: an outage that fills the memory tier and then the disk tier
/// peaked at 100 to 109 MB with glibc, which kept freed memory it could not hand back, and at
/// 80 to 82 MB with jemalloc, which also hands freed pages back to the system within seconds.
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const EXIT_CONFIG: u8 = 64;
const EXIT_FAILURE: u8 = 1;

fn main() -> ExitCode {
    let command = match config::parse_args(std::env::args().skip(1)) {
        Ok(command) => command,
        Err(e) => return usage_error(&e),
    };
    if command.help {
        print!("{}", config::help());
        return ExitCode::SUCCESS;
    }
    if command.version {
        println!("mqtt-kafka-bridge {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }

    if command.healthcheck {
        // Only HEALTH_ADDR and HEALTH_PORT count: the check must not fail on other settings.
        let environment = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .chain(command.values);
        let addr = match config::health_addr(environment, command.env_file.as_deref()) {
            Ok(addr) => addr,
            Err(e) => return usage_error(&e.to_string()),
        };
        return match mqtt_kafka_bridge::healthcheck(addr) {
            Ok(status) => {
                println!("{status}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("mqtt-kafka-bridge healthcheck: {e}");
                ExitCode::from(EXIT_FAILURE)
            }
        };
    }
    let host_name = gethostname::gethostname()
        .into_string()
        .unwrap_or_else(|_| "mqtt-kafka-bridge".to_owned());
    // Variables that are not UTF-8 cannot be ours; skip them rather than panic.
    let environment = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        // Flags come last: they win over the environment.
        .chain(command.values);
    let config = match config::load(environment, command.env_file.as_deref(), &host_name) {
        Ok(config) => config,
        Err(e) => return usage_error(&e.to_string()),
    };
    if let Some(topic) = &command.route {
        let payload = match &command.payload {
            Some(path) => match std::fs::read(path) {
                Ok(payload) => payload,
                Err(e) => {
                    return usage_error(&format!("cannot read --payload {}: {e}", path.display()));
                }
            },
            None => Vec::new(),
        };
        print!(
            "{}",
            mqtt_kafka_bridge::explain_route(&config, topic, payload)
        );
        return ExitCode::SUCCESS;
    }
    if command.check_config {
        println!("# Configuration is valid. Effective values (secrets shown as ***):");
        for (name, value) in &config.effective {
            println!("{name}={value}");
        }
        println!("# MQTT client id: {}", config.mqtt.client_id);
        println!("# Kafka brokers: {}", config.kafka.brokers);
        return ExitCode::SUCCESS;
    }
    if let Err(e) = mkb_log::init(config.log) {
        eprintln!("mqtt-kafka-bridge: {e}");
        return ExitCode::from(EXIT_FAILURE);
    }
    if !command.ignored.is_empty() {
        tracing::warn!(
            flags = ?command.ignored,
            "Metamorphosis flags without a meaning here were ignored."
        );
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.worker_threads)
        .enable_all()
        .build();
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!(error = %e, "Cannot start the async runtime.");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let result = runtime.block_on(mqtt_kafka_bridge::run(config, shutdown_signal()));
    // Dropping a runtime waits for every blocking call without limit: a disk spool call stuck
    // in the kernel (a dead disk) must not keep the process from exiting once the drain ended.
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// How long the exit waits for blocking calls still running after the drain.
const RUNTIME_SHUTDOWN: std::time::Duration = std::time::Duration::from_secs(2);

fn usage_error(message: &str) -> ExitCode {
    eprintln!("mqtt-kafka-bridge: {message}");
    ExitCode::from(EXIT_CONFIG)
}

/// Completes on the first SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "Cannot watch SIGTERM; stopping on SIGINT only.");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    tracing::info!("Signal received.");
}
