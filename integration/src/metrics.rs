//! Prometheus text-format scrapes: a small parser for assertions, and
//! `promtool check metrics` when it is installed.

use std::collections::BTreeMap;
use std::process::Stdio;

use anyhow::{Context, bail};
use tokio::io::AsyncWriteExt;

/// One sample line: `name{labels} value`.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed scrape.
#[derive(Clone, Debug, Default)]
pub struct Scrape {
    pub text: String,
    pub samples: Vec<Sample>,
}

impl Scrape {
    /// Parses the Prometheus text format (comments skipped).
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let mut samples = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            samples.push(parse_line(line).with_context(|| format!("line {}: {line:?}", n + 1))?);
        }
        Ok(Self {
            text: text.to_owned(),
            samples,
        })
    }

    /// Samples named `name` whose labels include every pair of `labels`.
    pub fn select<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).is_some_and(|x| x == v))
        })
    }

    /// Sum of [`Scrape::select`].
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.select(name, labels).map(|s| s.value).sum()
    }

    /// Whether any series carries label `key` with value `value`.
    pub fn mentions(&self, key: &str, value: &str) -> bool {
        self.samples
            .iter()
            .any(|s| s.labels.get(key).is_some_and(|v| v == value))
    }
}

fn parse_line(line: &str) -> anyhow::Result<Sample> {
    let split = line.find(['{', ' ']).context("no value")?;
    let (name, rest) = line.split_at(split);
    let (labels, rest) = match rest.strip_prefix('{') {
        Some(body) => parse_labels(body)?,
        None => (BTreeMap::new(), rest),
    };
    let value_text = rest.split_whitespace().next().context("no value")?;
    let value = match value_text {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse::<f64>().with_context(|| format!("value {v:?}"))?,
    };
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// Parses `k="v",...}` and returns the labels and what follows the `}`.
fn parse_labels(body: &str) -> anyhow::Result<(BTreeMap<String, String>, &str)> {
    let b = body.as_bytes();
    let at = |i: usize| b.get(i).copied().context("unterminated labels");
    let mut labels = BTreeMap::new();
    let mut i = 0;
    loop {
        while matches!(at(i)?, b',' | b' ') {
            i += 1;
        }
        if at(i)? == b'}' {
            return Ok((labels, &body[i + 1..]));
        }
        let eq = body[i..].find('=').context("label without =")? + i;
        let key = body[i..eq].trim().to_owned();
        i = eq + 1;
        anyhow::ensure!(at(i)? == b'"', "label value not quoted");
        i += 1;
        let mut value = Vec::new();
        loop {
            match at(i)? {
                b'\\' => {
                    i += 1;
                    value.push(if at(i)? == b'n' { b'\n' } else { at(i)? });
                }
                b'"' => break,
                c => value.push(c),
            }
            i += 1;
        }
        i += 1;
        labels.insert(
            key,
            String::from_utf8(value).context("label value is not UTF-8")?,
        );
    }
}

/// The outcome of [`promtool_check`].
#[derive(Debug)]
pub enum Promtool {
    /// `promtool check metrics` accepted the text.
    Passed,
    /// It is not installed.
    Missing,
}

/// Runs `promtool check metrics` on `text`; an error carries its complaints.
pub async fn promtool_check(text: &str) -> anyhow::Result<Promtool> {
    let child = tokio::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Promtool::Missing),
        Err(e) => return Err(e).context("running promtool"),
    };
    let mut stdin = child.stdin.take().context("promtool stdin")?;
    stdin.write_all(text.as_bytes()).await?;
    drop(stdin);
    let out = crate::within(
        "promtool",
        std::time::Duration::from_secs(30),
        child.wait_with_output(),
    )
    .await??;
    if out.status.success() {
        Ok(Promtool::Passed)
    } else {
        bail!(
            "promtool check metrics failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_labels_and_values() {
        let text = "# HELP x y\n# TYPE x counter\nx{service=\"web\",instance_name=\"a\\\"b\"} 3\nup 1\nh_bucket{le=\"+Inf\"} 2\n";
        let s = Scrape::parse(text).unwrap();
        assert_eq!(s.samples.len(), 3);
        assert_eq!(s.samples[0].labels["instance_name"], "a\"b");
        assert_eq!(s.sum("x", &[("service", "web")]), 3.0);
        assert_eq!(s.sum("up", &[]), 1.0);
        assert!(s.mentions("le", "+Inf"));
        assert!(Scrape::parse("x{a=\"1\" 2\n").is_err());
    }
}
