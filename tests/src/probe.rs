//! The probe guest (`resources/probe`): where its ELF is, and a parser for
//! the `PROBE ...` lines it prints on the serial console.
//!
//! Line format (see `resources/probe/README.md`):
//! `PROBE <check> ok|FAIL|skip <details> tsc=<n>`, `PROBE tick <n> <tsc>`,
//! `PROBE begin ...`, and finally `PROBE DONE <passed>/<total>`.

use std::path::PathBuf;

/// The probe ELF built by `tests/build.rs`.
pub fn elf_path() -> PathBuf {
    PathBuf::from(env!("CINDER_PROBE_ELF"))
}

/// Outcome of one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// `ok`: the check passed.
    Ok,
    /// `FAIL`: the check failed.
    Fail,
    /// `skip`: a device the check needs is absent (neither passed nor counted in the total).
    Skip,
}

/// One `PROBE <check> <status> <details>` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    /// The check's name (`<check>`).
    pub name: String,
    /// Its status word.
    pub status: Status,
    /// Everything after the status word (including the trailing `tsc=`).
    pub details: String,
}

impl Check {
    /// The value of a `key=value` token in the details (first match).
    pub fn field(&self, key: &str) -> Option<&str> {
        field(&self.details, key)
    }

    /// A numeric field (decimal or 0x hex).
    pub fn num(&self, key: &str) -> Option<u64> {
        self.field(key).and_then(parse_num)
    }
}

/// Everything the probe reported in one run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProbeLog {
    /// Details of the `PROBE begin` line, if printed.
    pub begin: Option<String>,
    /// The check result lines, in the order printed.
    pub checks: Vec<Check>,
    /// `PROBE tick <n> <tsc>` lines: (n, tsc).
    pub ticks: Vec<(u64, u64)>,
    /// `PROBE DONE <passed>/<total>`.
    pub done: Option<(u32, u32)>,
    /// `PROBE` lines that did not parse.
    pub unparsed: Vec<String>,
}

impl ProbeLog {
    /// The first result line of a check.
    pub fn check(&self, name: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.name == name)
    }

    /// True if DONE was printed and every counted check passed.
    pub fn all_passed(&self) -> bool {
        matches!(self.done, Some((p, t)) if p == t)
    }
}

/// The value of `key=` in a space-separated detail string.
pub fn field<'a>(details: &'a str, key: &str) -> Option<&'a str> {
    details.split_whitespace().find_map(|t| {
        t.strip_prefix(key)
            .and_then(|rest| rest.strip_prefix('='))
            .map(|v| v.trim_end_matches(';'))
    })
}

/// Decimal or `0x` hexadecimal.
pub fn parse_num(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

/// Parses a serial log. Lines may be surrounded by other output (firmware,
/// kernel); only lines starting with `PROBE ` count.
pub fn parse(log: &str) -> ProbeLog {
    let mut out = ProbeLog::default();
    for raw in log.lines() {
        let line = raw.trim_end_matches('\r');
        let Some(rest) = line.strip_prefix("PROBE ") else {
            continue;
        };
        let mut it = rest.splitn(3, ' ');
        let name = it.next().unwrap_or("");
        let word = it.next().unwrap_or("");
        let details = it.next().unwrap_or("").to_string();
        match (name, word) {
            ("DONE", counts) => {
                let parsed = counts
                    .split_once('/')
                    .and_then(|(p, t)| Some((p.trim().parse().ok()?, t.trim().parse().ok()?)));
                match parsed {
                    Some(d) => out.done = Some(d),
                    None => out.unparsed.push(line.to_string()),
                }
            }
            ("begin", _) => out.begin = Some(rest["begin".len()..].trim().to_string()),
            (_, "ok" | "FAIL" | "skip") => out.checks.push(Check {
                name: name.to_string(),
                status: match word {
                    "ok" => Status::Ok,
                    "FAIL" => Status::Fail,
                    _ => Status::Skip,
                },
                details,
            }),
            ("tick", n) => match (n.parse(), details.trim().parse()) {
                (Ok(n), Ok(tsc)) => out.ticks.push((n, tsc)),
                _ => out.unparsed.push(line.to_string()),
            },
            _ => out.unparsed.push(line.to_string()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "firmware noise\r\n\
PROBE begin entry=pvh checks=3 tsc_khz=2500000 tsc=1\r\n\
PROBE boot ok entry=pvh ebx=0xf31e0 cmdline=\"a b\" tsc=5\n\
PROBE smp FAIL 1 CPUs online but the madt lists 2; cpus=1 expected=2 tsc=9\n\
PROBE tick 1 100\n\
PROBE tick 2 200\n\
PROBE tick ok ticks=2 tick_ms=20 tsc=300\n\
PROBE virtio skip no devices tsc=400\n\
PROBE weird\n\
PROBE DONE 2/3\n";

    #[test]
    fn parses_checks_ticks_and_done() {
        let p = parse(LOG);
        assert_eq!(
            p.begin.as_deref(),
            Some("entry=pvh checks=3 tsc_khz=2500000 tsc=1")
        );
        assert_eq!(p.checks.len(), 4);
        let boot = p.check("boot").expect("boot");
        assert_eq!(boot.status, Status::Ok);
        assert_eq!(boot.field("entry"), Some("pvh"));
        assert_eq!(boot.num("ebx"), Some(0xf31e0));
        assert_eq!(boot.num("tsc"), Some(5));
        let smp = p.check("smp").expect("smp");
        assert_eq!(smp.status, Status::Fail);
        assert_eq!(smp.num("expected"), Some(2));
        assert_eq!(p.check("virtio").map(|c| c.status), Some(Status::Skip));
        assert_eq!(p.ticks, vec![(1, 100), (2, 200)]);
        assert_eq!(p.check("tick").and_then(|c| c.num("ticks")), Some(2));
        assert_eq!(p.done, Some((2, 3)));
        assert!(!p.all_passed());
        assert_eq!(p.unparsed, vec!["PROBE weird".to_string()]);
    }

    #[test]
    fn no_done_means_not_passed() {
        let p = parse("PROBE boot ok x=1\n");
        assert_eq!(p.done, None);
        assert!(!p.all_passed());
    }

    #[test]
    fn field_ignores_prefix_matches() {
        assert_eq!(field("usable_mib=3 usable=4", "usable"), Some("4"));
        assert_eq!(field("a=1;", "a"), Some("1"));
        assert_eq!(parse_num("0x1f"), Some(31));
        assert_eq!(parse_num("zz"), None);
    }
}
