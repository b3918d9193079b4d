//! Charts of runs from their metrics logs ([`crate::metrics`]): training loss (a line per run,
//! held-out evaluations as dots) and throughput against the step, side by side, one colour per
//! run, so layouts or schedules can be compared on one chart. Drawn with plotters to SVG and
//! PNG; PNG text uses an embedded 10 KB font subset (no system font library needed).

use std::path::{Path, PathBuf};
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::metrics::Run;
use crate::Error;

/// Chart size in pixels.
const SIZE: (u32, u32) = (1200, 480);

/// Colours of successive runs (colour-blind-safe Tableau 10).
const PALETTE: [RGBColor; 8] = [
    RGBColor(78, 121, 167),
    RGBColor(242, 142, 43),
    RGBColor(225, 87, 89),
    RGBColor(89, 161, 79),
    RGBColor(176, 122, 161),
    RGBColor(118, 183, 178),
    RGBColor(237, 201, 72),
    RGBColor(156, 117, 95),
];

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans-subset.ttf");

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The font is a compile-time constant checked by the tests; a failure would only lose text.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// The files `plot` wrote.
#[derive(Debug, Clone)]
pub struct Plotted {
    pub svg: PathBuf,
    pub png: PathBuf,
}

/// Draws `runs` to `<out>.svg` and `<out>.png` (`out` without an extension), each named in
/// the legend by its `info.label`. Throughput is smoothed over `smooth` steps (a running mean;
/// 1: raw).
pub fn plot(runs: &[Run], out: &Path, smooth: usize) -> Result<Plotted, Error> {
    if runs.is_empty() {
        return Err(Error::Config("nothing to plot: no runs given".into()));
    }
    if let Some(empty) = runs.iter().find(|r| r.steps.is_empty()) {
        return Err(Error::Config(format!("{} has no training steps to plot", empty.path.display())));
    }
    register_font();
    let svg = out.with_extension("svg");
    let png = out.with_extension("png");
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::Config(format!("cannot create {}: {e}", dir.display())))?;
    }
    let draw_err = |e: String| Error::Config(format!("drawing the chart: {e}"));
    {
        let root = SVGBackend::new(&svg, SIZE).into_drawing_area();
        draw(&root, runs, smooth).map_err(draw_err)?;
        root.present().map_err(|e| draw_err(e.to_string()))?;
    }
    let mut pixels = vec![0u8; (SIZE.0 * SIZE.1 * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, SIZE).into_drawing_area();
        draw(&root, runs, smooth).map_err(draw_err)?;
        root.present().map_err(|e| draw_err(e.to_string()))?;
    }
    write_png(&png, &pixels, SIZE).map_err(|e| Error::Config(format!("cannot write {}: {e}", png.display())))?;
    Ok(Plotted { svg, png })
}

fn write_png(path: &Path, rgb: &[u8], (w, h): (u32, u32)) -> std::result::Result<(), String> {
    let file = std::fs::File::create(path).map_err(|e| e.to_string())?;
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), w, h);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(|e| e.to_string())?;
    writer.write_image_data(rgb).map_err(|e| e.to_string())?;
    writer.finish().map_err(|e| e.to_string())
}

/// Running mean of the last `window` values.
fn running_mean(values: &[f64], window: usize) -> Vec<f64> {
    let window = window.max(1);
    let mut sum = 0.0;
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            sum += v;
            if i >= window {
                sum -= values[i - window];
            }
            sum / (i + 1).min(window) as f64
        })
        .collect()
}

/// Bounds padded by 5% (and never empty).
fn padded(lo: f64, hi: f64) -> std::ops::Range<f64> {
    let (lo, hi) = if lo.is_finite() && hi.is_finite() { (lo, hi) } else { (0.0, 1.0) };
    let pad = ((hi - lo) * 0.05).max(hi.abs() * 1e-3).max(1e-9);
    (lo - pad)..(hi + pad)
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    runs: &[Run],
    smooth: usize,
) -> std::result::Result<(), String> {
    let e = |err: DrawingAreaErrorKind<DB::ErrorType>| err.to_string();
    root.fill(&WHITE).map_err(e)?;
    let (left, right) = root.split_horizontally(SIZE.0 / 2);
    let max_step = runs.iter().flat_map(|r| r.steps.last().map(|s| s.step)).max().unwrap_or(1).max(1) as f64;
    let min_step = runs.iter().flat_map(|r| r.steps.first().map(|s| s.step)).min().unwrap_or(0) as f64;
    let x_range = (min_step - 0.5).max(0.0)..max_step + 0.5;

    // Loss: training per step, held-out evaluations as dots.
    let losses = runs.iter().flat_map(|r| r.steps.iter().map(|s| s.loss).chain(r.evals.iter().map(|v| v.loss)));
    let (lo, hi) =
        losses.filter(|l| l.is_finite()).fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), l| (a.min(l), b.max(l)));
    let mut chart = ChartBuilder::on(&left)
        .caption("loss (line: train, dots: held-out)", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(x_range.clone(), padded(lo, hi))
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("loss")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(e)?;
    for (i, run) in runs.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        chart
            .draw_series(LineSeries::new(run.steps.iter().map(|s| (s.step as f64, s.loss)), colour.stroke_width(2)))
            .map_err(e)?
            .label(run.info.label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(3)));
        chart
            .draw_series(run.evals.iter().map(|v| Circle::new((v.step as f64, v.loss), 4, colour.filled())))
            .map_err(e)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .position(SeriesLabelPosition::UpperRight)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(e)?;

    // Throughput, smoothed.
    let unit = runs.iter().map(|r| r.info.unit.as_str()).find(|u| !u.is_empty()).unwrap_or("items/s");
    let series: Vec<Vec<(f64, f64)>> = runs
        .iter()
        .map(|r| {
            let raw: Vec<f64> = r.steps.iter().map(|s| s.items_per_sec).collect();
            r.steps.iter().map(|s| s.step as f64).zip(running_mean(&raw, smooth)).collect()
        })
        .collect();
    let top = series.iter().flatten().map(|p| p.1).filter(|v| v.is_finite()).fold(0.0, f64::max);
    let caption = if smooth > 1 {
        format!("throughput ({unit}, mean of {smooth} steps)")
    } else {
        format!("throughput ({unit})")
    };
    let mut chart = ChartBuilder::on(&right)
        .caption(caption, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(x_range, 0.0..(top * 1.1).max(1e-9))
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc(unit)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(e)?;
    for (i, points) in series.into_iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        chart.draw_series(LineSeries::new(points, colour.stroke_width(2))).map_err(e)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_mean_and_padding() {
        assert_eq!(running_mean(&[1.0, 3.0, 5.0, 7.0], 2), vec![1.0, 2.0, 4.0, 6.0]);
        assert_eq!(running_mean(&[1.0, 3.0], 1), vec![1.0, 3.0]);
        let r = padded(1.0, 3.0);
        assert!(r.start < 1.0 && r.end > 3.0);
        let flat = padded(2.0, 2.0);
        assert!(flat.start < 2.0 && flat.end > 2.0);
        assert!(ab_glyph_font_parses());
    }

    fn ab_glyph_font_parses() -> bool {
        plotters::style::register_font("test-font", FontStyle::Normal, FONT).is_ok()
    }
}
