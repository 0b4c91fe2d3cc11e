//! Redis `INFO commandstats` read before and after a step, so a relay
//! report can say which commands Redis ran per published event and what
//! they cost it (Redis' own `usec`, which excludes network I/O).
//!
//! The table of a comparison ([`redis_commands_markdown`]) is here too.
//!
//! One `INFO` over a plain TCP connection in RESP: the load generator has
//! no Redis client otherwise, and this is all it needs.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::relay::StepReport;

/// Calls and CPU time of one command, cumulative since Redis started.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Counts {
    /// Calls.
    pub calls: u64,
    /// Microseconds Redis spent in the command (its own measure).
    pub usec: u64,
}

/// `cmdstat_<name>` → counts.
pub type Snapshot = BTreeMap<String, Counts>;

/// One command's share of a step.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CommandUse {
    /// Command name, lower case (`evalsha`, `xadd`, `publish`, …).
    pub command: String,
    /// Calls during the step.
    pub calls: u64,
    /// Microseconds Redis spent in it during the step.
    pub usec: u64,
}

/// Reads `INFO commandstats` from Redis on 127.0.0.1:`port`.
pub fn snapshot(port: u16) -> anyhow::Result<Snapshot> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).context("connect to Redis")?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"*2\r\n$4\r\nINFO\r\n$12\r\ncommandstats\r\n")?;
    let mut r = BufReader::new(s);
    let mut head = String::new();
    r.read_line(&mut head)?;
    let Some(len) = head.strip_prefix('$') else {
        bail!("unexpected INFO reply {head:?}");
    };
    let len: usize = len.trim().parse().context("INFO reply length")?;
    let mut body = vec![0; len];
    r.read_exact(&mut body)?;
    Ok(parse(&String::from_utf8_lossy(&body)))
}

/// Parses lines `cmdstat_xadd:calls=3,usec=12,usec_per_call=4.00,…`.
pub fn parse(text: &str) -> Snapshot {
    let mut out = Snapshot::new();
    for line in text.lines() {
        let Some((name, fields)) = line.trim().split_once(':') else {
            continue;
        };
        let Some(name) = name.strip_prefix("cmdstat_") else {
            continue;
        };
        let mut c = Counts::default();
        for kv in fields.split(',') {
            match kv.split_once('=') {
                Some(("calls", v)) => c.calls = v.parse().unwrap_or(0),
                Some(("usec", v)) => c.usec = v.parse().unwrap_or(0),
                _ => {}
            }
        }
        out.insert(name.to_owned(), c);
    }
    out
}

/// What ran between two snapshots, costliest first; commands not called
/// in between are left out.
pub fn between(before: &Snapshot, after: &Snapshot) -> Vec<CommandUse> {
    let mut out: Vec<CommandUse> = after
        .iter()
        .filter_map(|(name, a)| {
            let b = before.get(name).copied().unwrap_or_default();
            let calls = a.calls.saturating_sub(b.calls);
            (calls > 0).then(|| CommandUse {
                command: name.clone(),
                calls,
                usec: a.usec.saturating_sub(b.usec),
            })
        })
        .collect();
    out.sort_by(|x, y| y.usec.cmp(&x.usec).then(x.command.cmp(&y.command)));
    out
}

/// Per published event, what Redis ran for each system in the first step
/// of a relay scenario (`INFO commandstats`): calls and Redis' own µs per
/// event, by command. A script's µs include the commands it ran, which are
/// also listed on their own lines.
pub fn redis_commands_markdown(scenario: &str, runs: &[(&str, &StepReport)]) -> String {
    let mut names: Vec<String> = Vec::new();
    for (_, st) in runs {
        for c in &st.redis_commands {
            if !names.contains(&c.command) {
                names.push(c.command.clone());
            }
        }
    }
    if names.is_empty() {
        return String::new();
    }
    let mut md = format!(
        "
{scenario}: Redis commands per published event (`INFO commandstats` while the step sent; a script's µs include the commands it ran)

| command |"
    );
    for (system, _) in runs {
        md.push_str(&format!(" {system} calls | {system} µs |"));
    }
    md.push_str(
        "
|---|",
    );
    for _ in runs {
        md.push_str("---:|---:|");
    }
    md.push('\n');
    for name in names {
        md.push_str(&format!("| {name} |"));
        for (_, st) in runs {
            let sent = st.sent.max(1) as f64;
            match st.redis_commands.iter().find(|c| c.command == name) {
                Some(c) => md.push_str(&format!(
                    " {:.2} | {:.2} |",
                    c.calls as f64 / sent,
                    c.usec as f64 / sent
                )),
                None => md.push_str(" – | – |"),
            }
        }
        md.push('\n');
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_subtracts() {
        let before = parse(
            "# Commandstats\r\ncmdstat_xadd:calls=10,usec=50,usec_per_call=5.00,rejected_calls=0,failed_calls=0\r\ncmdstat_ping:calls=3,usec=1,usec_per_call=0.33\r\n",
        );
        let after = parse(
            "# Commandstats\r\ncmdstat_xadd:calls=30,usec=150,usec_per_call=5.00\r\ncmdstat_ping:calls=3,usec=1\r\ncmdstat_evalsha:calls=20,usec=400\r\n",
        );
        assert_eq!(
            before["xadd"],
            Counts {
                calls: 10,
                usec: 50
            }
        );
        assert_eq!(
            between(&before, &after),
            vec![
                CommandUse {
                    command: "evalsha".into(),
                    calls: 20,
                    usec: 400
                },
                CommandUse {
                    command: "xadd".into(),
                    calls: 20,
                    usec: 100
                },
            ]
        );
    }
}
