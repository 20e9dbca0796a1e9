//! The PNG of `docs/gossip-sim.png`: per scenario (columns), max/mean in
//! flight (top) and p99 latency (bottom) against the report interval.
//!
//! Drawn with plotters' bitmap backend into a buffer and encoded with `png`,
//! so nothing needs system libraries. Text needs a TrueType font
//! ([`load_font`]); without one the chart is drawn without any text.

use plotters::prelude::*;

use super::Strategy;
use super::suite::{ESTIMATORS, INTERVALS, ScenarioResults};

/// Why the plot could not be made.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("drawing: {0}")]
    Draw(String),
    #[error("encoding PNG: {0}")]
    Png(#[from] png::EncodingError),
}

/// Font files tried by [`load_font`] when no path is given.
pub const FONT_PATHS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

/// Registers the font at `path` (or the first of [`FONT_PATHS`] that exists)
/// as plotters' "sans-serif". Returns whether a font is available.
pub fn load_font(path: Option<&str>) -> bool {
    let candidates: Vec<&str> = path.map_or_else(|| FONT_PATHS.to_vec(), |p| vec![p]);
    for p in candidates {
        if let Ok(bytes) = std::fs::read(p) {
            // Registered fonts live for the whole process.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                return true;
            }
        }
    }
    false
}

const COLORS: [RGBColor; 3] = [
    RGBColor(214, 39, 40),
    RGBColor(255, 127, 14),
    RGBColor(31, 119, 180),
];
const CENTRAL: RGBColor = RGBColor(44, 160, 44);
const LOCAL: RGBColor = RGBColor(110, 110, 110);

fn draw_err<E: std::fmt::Debug>(e: E) -> Error {
    Error::Draw(format!("{e:?}"))
}

/// Renders `results` as a PNG image; `text` draws captions, labels and
/// legends (needs [`load_font`]).
pub fn render(results: &[ScenarioResults], text: bool) -> Result<Vec<u8>, Error> {
    let cols = results.len().max(1) as u32;
    let (w, h) = (600 * cols, 800);
    let mut buf = vec![0u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let panels = root.split_evenly((2, results.len().max(1)));
        for (i, r) in results.iter().enumerate() {
            panel(&panels[i], r, Metric::MaxMean, text)?;
            panel(&panels[results.len() + i], r, Metric::P99, text)?;
        }
        root.present().map_err(draw_err)?;
    }
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, w, h);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.write_header()?.write_image_data(&buf)?;
    Ok(out)
}

#[derive(Clone, Copy)]
enum Metric {
    MaxMean,
    P99,
}

impl Metric {
    fn of(self, o: &super::Outcome) -> f64 {
        match self {
            Self::MaxMean => o.max_mean,
            Self::P99 => o.p99_latency * 1e3,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::MaxMean => "max/mean in flight",
            Self::P99 => "p99 latency (ms)",
        }
    }
}

fn panel(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    r: &ScenarioResults,
    metric: Metric,
    text: bool,
) -> Result<(), Error> {
    let value = |label: &str| r.get(label).map(|o| metric.of(o));
    let values: Vec<f64> = r.rows.iter().map(|(_, o)| metric.of(o)).collect();
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(0.0f64, f64::max);
    let pad = (hi - lo).max(1e-3) * 0.08;
    // The intervals are categories, evenly spaced.
    let mut builder = ChartBuilder::on(area);
    builder.margin(12);
    if text {
        builder
            .caption(&r.scenario.name, ("sans-serif", 14))
            .x_label_area_size(36)
            .y_label_area_size(56);
    }
    let mut chart = builder
        .build_cartesian_2d(
            // Segments 0..=n-1, one per interval.
            (0..INTERVALS.len() - 1).into_segmented(),
            // Room at the top for the legend.
            (lo - pad).max(0.0)..hi + if text { 5.0 * pad } else { pad },
        )
        .map_err(draw_err)?;
    let interval_label = |v: &SegmentValue<usize>| match v {
        SegmentValue::CenterOf(i) => INTERVALS
            .get(*i)
            .map_or_else(String::new, |ms| format!("{ms} ms")),
        _ => String::new(),
    };
    let mut mesh = chart.configure_mesh();
    mesh.disable_x_mesh().max_light_lines(2);
    if text {
        mesh.x_desc("gossip_min_interval")
            .y_desc(metric.label())
            .x_label_formatter(&interval_label);
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw().map_err(draw_err)?;

    for (label, color) in [("central", CENTRAL), ("local only", LOCAL)] {
        if let Some(y) = value(label) {
            let series = chart
                .draw_series(LineSeries::new(
                    [(SegmentValue::Exact(0), y), (SegmentValue::Last, y)],
                    color.stroke_width(2),
                ))
                .map_err(draw_err)?;
            if text {
                series.label(label).legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 18, y)], color.stroke_width(2))
                });
            }
        }
    }
    for (estimator, color) in ESTIMATORS.into_iter().zip(COLORS) {
        let points: Vec<(SegmentValue<usize>, f64)> = INTERVALS
            .iter()
            .enumerate()
            .filter_map(|(i, &ms)| {
                let y = value(&Strategy::gossip(estimator, ms).label())?;
                Some((SegmentValue::CenterOf(i), y))
            })
            .collect();
        let name = Strategy::gossip(estimator, 0).label();
        let name = name.split(" @").next().unwrap_or_default().to_owned();
        let series = chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(draw_err)?;
        if text {
            series.label(name).legend(move |(x, y)| {
                PathElement::new([(x, y), (x + 18, y)], color.stroke_width(2))
            });
        }
        chart
            .draw_series(
                points
                    .iter()
                    .map(|p| Circle::new(p.clone(), 4, color.filled())),
            )
            .map_err(draw_err)?;
    }
    if text {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 13))
            .draw()
            .map_err(draw_err)?;
    }
    Ok(())
}
