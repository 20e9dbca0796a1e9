//! Compressed scrapes: one gzip member holding exactly the text, with only
//! the blocks whose samples changed compressed again.

use std::io::Read as _;

use flate2::read::GzDecoder;

use super::*;
use crate::metrics::zipped::Blocks;

/// A compressed scrape of `table`, decoded (the decoder checks the CRC and
/// length), and what it reused.
fn zip(metrics: &Metrics, table: &RoutingTable) -> (String, Blocks) {
    let scrape = instance::Scrape::of(table, Instant::now());
    let (head, tail) = metrics.registry_text(table, &scrape).expect("registry");
    let mut body = Vec::new();
    let blocks = metrics
        .zipper
        .write(&scrape, &head, &tail, &mut body)
        .expect("compress");
    let mut text = String::new();
    GzDecoder::new(&body[..])
        .read_to_string(&mut text)
        .expect("a valid gzip member");
    (text, blocks)
}

fn many(groups: usize, instances: usize) -> State {
    let names: Vec<String> = (0..instances).map(|i| format!("i{i}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let groups: Vec<(String, &[&str])> = (0..groups)
        .map(|g| (format!("g{g}"), names.as_slice()))
        .collect();
    let groups: Vec<(&str, &[&str])> = groups.iter().map(|(g, n)| (g.as_str(), *n)).collect();
    state(&groups)
}

#[test]
fn a_compressed_scrape_is_the_text_and_compresses_only_what_changed() {
    let routes = ArcSwap::from_pointee(RoutingTable::default());
    // Block boundaries follow a keyed hash of each row's labels, with this
    // process's random keys: enough rows that every section has many
    // blocks, so that the two blocks per section a detach and an attach
    // may touch are a minority whatever the keys (with 1,200 rows a
    // section had two or three blocks, and some keys made the changed
    // ones the majority).
    let mut s = many(12, 500);
    let table1 = table(&routes, &s);
    let metrics = Metrics::new();
    metrics.admin_request(200);

    let (text, first) = zip(&metrics, &table1);
    assert_eq!(text, metrics.render(&table1));
    assert_eq!(first.reused, 0);
    assert!(first.compressed > 14, "{first:?}");

    let (text, second) = zip(&metrics, &table1);
    assert_eq!(text, metrics.render(&table1));
    assert_eq!(
        second,
        Blocks {
            reused: first.compressed,
            compressed: 0
        }
    );

    // One instance counts: its histogram block and its `selected` block.
    let (_, b) = &backends(&table1)[17];
    b.metrics.selected.inc();
    b.metrics.duration.observe(0.003);
    let (text, third) = zip(&metrics, &table1);
    assert_eq!(text, metrics.render(&table1));
    assert_eq!(third.compressed, 2, "{third:?}");
    assert!(text.contains(&format!(
        "edgelb_instance_selected_total{{instance_name=\"{}\",service=\"{}\"}} 1\n",
        b.name,
        backends(&table1)[17].0
    )));

    // A detach and an attach change the blocks they fall in, not those
    // after them.
    s.apply(&Command::DetachInstance {
        group: "g1".into(),
        instance: "i100".into(),
    })
    .expect("detach");
    s.apply(&Command::AttachInstance {
        group: "g2".into(),
        instance: Instance {
            uuid: Uuid::new_v4(),
            name: "i9999".into(),
            address: "10.0.1.1".into(),
        },
    })
    .expect("attach");
    let table2 = table(&routes, &s);
    let (text, fourth) = zip(&metrics, &table2);
    assert_eq!(text, metrics.render(&table2));
    assert!(
        fourth.compressed <= 4 * 14 && fourth.reused > fourth.compressed,
        "{fourth:?}"
    );
}

#[test]
fn a_compressed_scrape_without_instances_is_the_text() {
    let metrics = Metrics::new();
    let (text, blocks) = zip(&metrics, &RoutingTable::default());
    assert_eq!(text, metrics.render(&RoutingTable::default()));
    assert_eq!(blocks, Blocks::default());
}
