//! `mkb-consume`: prints what the bridge wrote to a Kafka topic, envelopes decoded.
//!
//! Usage: mkb-consume BROKERS TOPIC COUNT [TIMEOUT_SECONDS]
//! Reads the topic from its first offset until COUNT records were read or TIMEOUT_SECONDS
//! (default 30) passed, prints one line per record, and exits 0 only if COUNT were read.
//! Debian's kcat is too old for tansu's handshake; this uses the project's own rdkafka.

use std::process::ExitCode;
use std::time::Duration;

use mkb_tests::KafkaReader;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (brokers, topic, count, timeout) = match args.as_slice() {
        [brokers, topic, count, rest @ ..] if rest.len() <= 1 => {
            let Ok(count) = count.parse::<usize>() else {
                return usage("COUNT must be a whole number");
            };
            let timeout = match rest.first().map(|t| t.parse::<u64>()) {
                None => 30,
                Some(Ok(seconds)) => seconds,
                Some(Err(_)) => return usage("TIMEOUT_SECONDS must be a whole number"),
            };
            (brokers, topic, count, Duration::from_secs(timeout))
        }
        _ => return usage("expected BROKERS TOPIC COUNT [TIMEOUT_SECONDS]"),
    };

    let mut reader = KafkaReader::new(brokers, topic).await;
    let records = reader.read_at_least(count, timeout).await;
    for record in records {
        let payload = match std::str::from_utf8(&record.payload) {
            Ok(text) => format!("{text:?}"),
            Err(_) => format!("{} bytes of binary", record.payload.len()),
        };
        println!(
            "partition {} offset {:>4}  mqtt topic {:<24} payload {}",
            record.partition, record.offset, record.mqtt_topic, payload
        );
    }
    if let Some(first) = records.first() {
        println!(
            "value of the first record: {}",
            String::from_utf8_lossy(&first.value)
        );
    }
    println!(
        "{} of {count} records read from Kafka topic {topic}",
        records.len()
    );
    if records.len() >= count {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn usage(problem: &str) -> ExitCode {
    eprintln!("mkb-consume: {problem}\nusage: mkb-consume BROKERS TOPIC COUNT [TIMEOUT_SECONDS]");
    ExitCode::from(64)
}
