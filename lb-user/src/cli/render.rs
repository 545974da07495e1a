//! The views as tables for a terminal (comfy-table: wrapped to the terminal's width; colour
//! only when stdout is a terminal), with human units.
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use comfy_table::{Cell, Color, ContentArrangement, Table};

use crate::telemetry::{
    status::StatusView,
    views::{FlowView, Rates, ServicesView, StatsView},
};

/// `1234` -> `1.2k`: counts with SI prefixes.
pub fn count(n: u64) -> String {
    scaled(n as f64, 1000.0, &["", "k", "M", "G", "T", "P"], "")
}

/// `1536` -> `1.5 KiB`: bytes with IEC prefixes.
pub fn bytes(n: u64) -> String {
    scaled(n as f64, 1024.0, &["B", "KiB", "MiB", "GiB", "TiB", "PiB"], " ")
}

fn scaled(mut value: f64, step: f64, units: &[&str], sep: &str) -> String {
    let mut unit = 0;
    while value >= step && unit + 1 < units.len() {
        value /= step;
        unit += 1;
    }
    if unit == 0 || value >= 100.0 {
        format!("{value:.0}{sep}{}", units[unit])
    } else {
        format!("{value:.1}{sep}{}", units[unit])
    }
}

/// `125 s` -> `2m05s`.
pub fn duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86_400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// How long ago a Unix time in milliseconds was.
fn ago(unix_ms: u64) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    format!("{} ago", duration(Duration::from_millis(now.saturating_sub(unix_ms))))
}

/// Columns as kubectl prints them, the header underlined.
const HEADER_LINE_ONLY: &str = "    ────           ";

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(HEADER_LINE_ONLY)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header.iter().map(|h| Cell::new(h).fg(Color::Cyan)));
    t
}

fn rate_cells(r: &Option<Rates>) -> [Cell; 3] {
    match r {
        Some(r) => [
            Cell::new(format!("{}/s", count(r.packets_per_s.round() as u64))),
            Cell::new(format!("{}/s", bytes(r.bytes_per_s.round() as u64))),
            Cell::new(format!("{}/s", count(r.new_flows_per_s.round() as u64))),
        ],
        None => [Cell::new("-"), Cell::new("-"), Cell::new("-")],
    }
}

/// Frontends, each followed by its backends; the drift column when the model was compared.
pub fn services(v: &ServicesView) -> String {
    let checked = v.drift.is_some();
    let mut header =
        vec!["FRONTEND", "KIND", "SERVICE", "POLICY", "BACKEND", "STATE", "LIVE", "NEW FLOWS", "PACKETS", "BYTES"];
    if checked {
        header.push("DRIFT");
    }
    let mut t = table(&header);
    for f in &v.frontends {
        let mut policy = vec![f.algorithm.clone()];
        if let Some(s) = f.affinity_timeout_s {
            policy.push(format!("affinity {s}s"));
        }
        // `external` is the kind's, `drop-when-empty` shows as the BACKEND of an empty set.
        policy.extend(f.flags.iter().filter(|fl| *fl != "external" && *fl != "drop-when-empty").cloned());
        if !f.source_ranges.is_empty() {
            policy.push(format!("sources {}", f.source_ranges.join(",")));
        }
        let service = f.service.as_ref().map_or("-".to_string(), ToString::to_string);
        let mut row = vec![
            Cell::new(&f.frontend),
            Cell::new(f.kind),
            Cell::new(service),
            Cell::new(policy.join(", ")),
            Cell::new(if f.backends.is_empty() { format!("none: {}", f.when_empty) } else { String::new() }),
            Cell::new(""),
            Cell::new(""),
            Cell::new(count(f.traffic.new_flows)),
            Cell::new(count(f.traffic.packets)),
            Cell::new(bytes(f.traffic.bytes)),
        ];
        if let Some(d) = &f.drift {
            row.push(if d.is_empty() {
                Cell::new("ok").fg(Color::Green)
            } else {
                Cell::new(format!("{} differ", d.len())).fg(Color::Red)
            });
        }
        t.add_row(row);
        for b in &f.backends {
            let mut state = b.state.to_string();
            if b.local {
                state.push_str(", local");
            }
            if b.slots[0] + b.slots[1] > 1 {
                state.push_str(&format!(", {} slots", b.slots[0] + b.slots[1]));
            }
            let colour = match b.state {
                "active" => Color::Reset,
                "retained" => Color::Yellow,
                _ => Color::Blue,
            };
            t.add_row(vec![
                Cell::new(""),
                Cell::new(""),
                Cell::new(""),
                Cell::new(""),
                Cell::new(format!("  {}", b.backend)),
                Cell::new(state).fg(colour),
                Cell::new(count(b.live_flows)),
                Cell::new(count(b.traffic.new_flows)),
                Cell::new(count(b.traffic.packets)),
                Cell::new(bytes(b.traffic.bytes)),
            ]);
        }
    }
    let mut out = format!("{t}\n");
    match &v.drift {
        Some(d) if d.is_empty() => out.push_str("The maps hold what the model wants.\n"),
        Some(d) => {
            out.push_str(&format!("{} differences from the model:\n", d.len()));
            for drift in d {
                out.push_str(&format!("  {drift}\n"));
            }
        }
        None => {
            out.push_str("(not compared with the model: give --manifests and --node-name, as the agent has them)\n")
        }
    }
    out.push_str("Backend traffic and live flows are their Service port's, over all its frontends.\n");
    out
}

/// Traffic per frontend, then per backend.
pub fn stats(v: &StatsView) -> String {
    let mut fe =
        table(&["SERVICE", "FRONTEND", "KIND", "PACKETS", "BYTES", "NEW FLOWS", "PKT/S", "BYTES/S", "FLOWS/S"]);
    for f in &v.frontends {
        let mut row = vec![
            Cell::new(f.service.as_ref().map_or("-".to_string(), ToString::to_string)),
            Cell::new(&f.frontend),
            Cell::new(f.kind),
            Cell::new(count(f.traffic.packets)),
            Cell::new(bytes(f.traffic.bytes)),
            Cell::new(count(f.traffic.new_flows)),
        ];
        row.extend(rate_cells(&f.rates));
        fe.add_row(row);
    }
    let mut be = table(&["SERVICE", "BACKEND", "LIVE", "PACKETS", "BYTES", "NEW FLOWS", "PKT/S", "BYTES/S", "FLOWS/S"]);
    for b in &v.backends {
        let service = match (&b.service, &b.protocol) {
            (Some(s), Some(p)) => format!("{s}/{p}"),
            _ => "-".to_string(),
        };
        let mut row = vec![
            Cell::new(service),
            Cell::new(format!("{}{}", b.backend, if b.local { " (local)" } else { "" })),
            Cell::new(count(b.live_flows)),
            Cell::new(count(b.traffic.packets)),
            Cell::new(bytes(b.traffic.bytes)),
            Cell::new(count(b.traffic.new_flows)),
        ];
        row.extend(rate_cells(&b.rates));
        be.add_row(row);
    }
    let rates = match v.interval_s {
        Some(s) => format!("rates over the last {s:.1} s"),
        None => "no rates: give --interval or --watch".to_string(),
    };
    format!("Frontends ({rates})\n{fe}\nBackends\n{be}\n")
}

/// One row per tracked flow.
pub fn flows(flows: &[FlowView]) -> String {
    let mut t = table(&["PROTO", "CLIENT", "FRONTEND", "BACKEND", "NAT", "STATE", "AGE", "EXPIRES", "SERVICE"]);
    for f in flows {
        let mut state = f.state.to_string();
        if !f.backend_current {
            state.push_str(" (backend gone)");
        }
        if f.orphan {
            state.push_str(" (one half)");
        }
        t.add_row(vec![
            Cell::new(&f.protocol),
            Cell::new(&f.original.src),
            Cell::new(&f.original.dst),
            Cell::new(&f.backend),
            Cell::new(f.nat.as_deref().unwrap_or("-")),
            Cell::new(state).fg(if f.backend_current && !f.orphan { Color::Reset } else { Color::Yellow }),
            Cell::new(duration(Duration::from_secs_f64(f.age_s))),
            Cell::new(duration(Duration::from_secs_f64(f.expires_in_s))),
            Cell::new(f.service.as_ref().map_or("-".to_string(), ToString::to_string)),
        ]);
    }
    format!("{t}\n{} flows\n", flows.len())
}

/// The status screen.
pub fn status(v: &StatusView) -> String {
    let mut out = format!("Pin directory {}\n\n", v.pin_dir);
    match &v.agent {
        None => out.push_str("Agent: none has run with these pins (loaded with `lb-user load`)\n"),
        Some(a) => {
            let running = if a.running { "running" } else { "NOT RUNNING" };
            out.push_str(&format!("Agent: pid {} {running}, started {}\n", a.pid, ago(a.started_unix_ms)));
            match a.last_sync_unix_ms {
                Some(t) => out.push_str(&format!(
                    "  last sync {} (took {:.1} ms): {} frontends; {} syncs, {} failed since start\n",
                    ago(t),
                    a.last_sync_duration_ms,
                    a.frontends,
                    a.syncs,
                    a.sync_errors
                )),
                None => out.push_str("  no sync yet\n"),
            }
            if let Some(p) = &a.last_problem {
                out.push_str(&format!("  {} problems at the last sync; the first: {p}\n", a.problems));
            }
        }
    }
    let d = &v.datapath;
    out.push_str(&format!(
        "Datapath: forwarding {}, node {}, local pods {}, SNAT ports {}\n\n",
        d.forwarding, d.node_address, d.local_pods, d.snat_ports
    ));
    let mut programs = table(&["PROGRAM", "ID", "LOADED", "ATTACHED"]);
    for p in &v.programs {
        let attached: Vec<String> = v
            .attachments
            .iter()
            .filter(|a| a.program == p.name)
            .map(|a| {
                let mut s = format!("{} {}", a.interface, a.hook);
                if let Some(id) = a.link_id {
                    s.push_str(&format!(" (link {id})"));
                }
                if !a.device_present {
                    s.push_str(" [device gone]");
                } else if !a.current {
                    s.push_str(" [runs another program]");
                }
                s
            })
            .collect();
        programs.add_row(vec![
            Cell::new(p.name),
            Cell::new(p.id.map_or("-".to_string(), |i| i.to_string())),
            Cell::new(p.loaded_unix_ms.map_or("-".to_string(), ago)),
            Cell::new(if attached.is_empty() { "-".to_string() } else { attached.join("\n") }),
        ]);
    }
    out.push_str(&format!("{programs}\n\n"));
    let mut maps = table(&["MAP", "ENTRIES", "CAPACITY", "USED", "LIMIT"]);
    for m in &v.maps {
        let used = m.entries as f64 * 100.0 / m.capacity.max(1) as f64;
        let colour = match m.limit.map_or(m.capacity, |l| l.min(m.capacity)) {
            l if m.entries >= l => Color::Red,
            l if m.entries * 10 >= l * 8 => Color::Yellow,
            _ => Color::Reset,
        };
        maps.add_row(vec![
            Cell::new(m.map),
            Cell::new(count(m.entries)),
            Cell::new(count(m.capacity)),
            Cell::new(format!("{used:.1}%")).fg(colour),
            Cell::new(m.limit.map_or("-".to_string(), |l| format!("{} (admission)", count(l)))),
        ]);
    }
    out.push_str(&format!("{maps}\n\n"));
    let n = &v.nat;
    out.push_str(&format!("NAT ports {} ({} per destination): {} SNAT flows", n.range, n.ports, n.snat_flows));
    if let Some(b) = &n.busiest {
        out.push_str(&format!("; busiest destination {b} holds {} of {} ports", n.busiest_ports, n.ports));
    }
    out.push_str("\n\n");
    let mut counters = table(&["KIND", "COUNTER", "PACKETS", "BYTES"]);
    for kind in ["drop", "answer", "pass", "translated", "event"] {
        for c in v.counters.iter().filter(|c| c.kind == kind && c.packets != 0) {
            let colour = if kind == "drop" { Color::Red } else { Color::Reset };
            counters.add_row(vec![
                Cell::new(kind).fg(colour),
                Cell::new(c.name),
                Cell::new(count(c.packets)),
                Cell::new(bytes(c.bytes)),
            ]);
        }
    }
    out.push_str(&format!("Counters (non-zero)\n{counters}\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_units() {
        assert_eq!(count(999), "999");
        assert_eq!(count(1234), "1.2k");
        assert_eq!(count(123_456_789), "123M");
        assert_eq!(bytes(100), "100 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(5 << 30), "5.0 GiB");
        assert_eq!(duration(Duration::from_secs(125)), "2m05s");
        assert_eq!(duration(Duration::from_secs(90_000)), "1d01h");
    }
}
