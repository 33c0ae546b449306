//! Loss and learning-rate curves of a training job, drawn to PNG or SVG.
//!
//! Text is drawn with a font embedded in the binary (a Latin subset of DejaVu Sans, see
//! `controller/cli/assets/`), so plotting needs no system font libraries where `cohort` runs.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use cohort_shared::metrics::TrainingMetrics;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{FontStyle, register_font};

const FONT: &[u8] = include_bytes!("../assets/DejaVuSans-subset.ttf");
const SIZE: (u32, u32) = (1200, 800);
const TRAIN_COLOR: RGBColor = RGBColor(31, 119, 180);
const EVAL_COLOR: RGBColor = RGBColor(214, 39, 40);
const LR_COLOR: RGBColor = RGBColor(44, 160, 44);

/// Why a plot was not written.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error(
        "--out {}: {}, not .png or .svg (the image format follows the extension: --out loss.png)",
        path.display(),
        if extension.is_empty() { "no extension".to_string() } else { format!("extension {extension:?}") }
    )]
    UnsupportedFormat { path: PathBuf, extension: String },
    #[error(
        "cannot plot {title}: no training point has a loss yet (is the job logging metrics? `cohort metrics` \
         shows what was parsed from its last rank's output: Megatron's `lm loss: ...`, ms-swift's `'loss': ...`)"
    )]
    NoLoss { title: String },
    #[error("cannot draw {}: {message}", path.display())]
    Draw { path: PathBuf, message: String },
    #[error("the embedded plot font is not a valid TrueType font")]
    Font,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Png,
    Svg,
}

/// The image format `path`'s extension names, `.png` or `.svg` (any case).
pub fn image_format(path: &Path) -> Result<ImageFormat, PlotError> {
    let extension = path.extension().and_then(|e| e.to_str()).unwrap_or_default().to_ascii_lowercase();
    match extension.as_str() {
        "png" => Ok(ImageFormat::Png),
        "svg" => Ok(ImageFormat::Svg),
        _ => Err(PlotError::UnsupportedFormat { path: path.to_path_buf(), extension }),
    }
}

/// Draws `title` over two stacked panels sharing the iteration axis: loss on top (training
/// loss as a line, evaluation loss, when `is_eval` points exist, as markers in another colour)
/// and learning rate below. The format follows `path`'s extension, `.png` or `.svg`.
///
/// When an iteration appears more than once (a resumed attempt replaying iterations after its
/// checkpoint), the last point wins, so the curves show the attempt that got furthest.
/// Non-finite values (a `nan` loss after an overflow) are left out.
pub fn plot_training(title: &str, points: &[TrainingMetrics], path: &Path) -> Result<(), PlotError> {
    let format = image_format(path)?;
    let curves = Curves::from_points(points);
    if curves.train_loss.is_empty() && curves.eval_loss.is_empty() {
        return Err(PlotError::NoLoss { title: title.to_owned() });
    }
    register_embedded_font()?;
    let drawn = if format == ImageFormat::Png {
        draw(BitMapBackend::new(path, SIZE).into_drawing_area(), title, &curves)
    } else {
        draw(SVGBackend::new(path, SIZE).into_drawing_area(), title, &curves)
    };
    drawn.map_err(|message| PlotError::Draw { path: path.to_path_buf(), message })
}

/// The series to draw, keyed by iteration.
struct Curves {
    train_loss: BTreeMap<u64, f64>,
    eval_loss: BTreeMap<u64, f64>,
    learning_rate: BTreeMap<u64, f64>,
}

impl Curves {
    fn from_points(points: &[TrainingMetrics]) -> Self {
        let mut curves =
            Curves { train_loss: BTreeMap::new(), eval_loss: BTreeMap::new(), learning_rate: BTreeMap::new() };
        for point in points {
            if let Some(loss) = point.loss.filter(|v| v.is_finite()) {
                let series = if point.is_eval { &mut curves.eval_loss } else { &mut curves.train_loss };
                series.insert(point.iteration, loss);
            }
            if let Some(lr) = point.learning_rate.filter(|v| v.is_finite())
                && !point.is_eval
            {
                curves.learning_rate.insert(point.iteration, lr);
            }
        }
        curves
    }

    /// The iteration span of every series, shared by both panels.
    fn iterations(&self) -> Range<f64> {
        let keys = self.train_loss.keys().chain(self.eval_loss.keys()).chain(self.learning_rate.keys());
        let (min, max) = keys.fold((u64::MAX, 0), |(lo, hi), &i| (lo.min(i), hi.max(i)));
        padded(min as f64, max as f64, 0.0)
    }

    fn loss_range(&self) -> Range<f64> {
        value_range(self.train_loss.values().chain(self.eval_loss.values()))
    }
}

/// `[min, max]` widened by `margin` of its width, and to a unit width when empty or flat.
fn padded(min: f64, max: f64, margin: f64) -> Range<f64> {
    if min > max {
        return 0.0..1.0;
    }
    let width = max - min;
    if width <= f64::EPSILON * max.abs().max(1.0) {
        let half = if min == 0.0 { 1.0 } else { min.abs() * 0.1 };
        return (min - half)..(max + half);
    }
    (min - width * margin)..(max + width * margin)
}

/// Enough decimals to tell the axis ticks of `range` apart: 2 for a width of 1 to 10.
fn decimals_for(range: &Range<f64>) -> usize {
    let magnitude = (range.end - range.start).log10().floor();
    if magnitude.is_finite() { (2.0 - magnitude).clamp(0.0, 6.0) as usize } else { 2 }
}

fn value_range<'a>(values: impl Iterator<Item = &'a f64>) -> Range<f64> {
    let (min, max) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    padded(min, max, 0.05)
}

/// Plotters looks fonts up by family name; every family name maps to the embedded font.
fn register_embedded_font() -> Result<(), PlotError> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = REGISTERED.get_or_init(|| {
        ["sans-serif", "serif", "monospace"].iter().all(|family| register_font(family, FontStyle::Normal, FONT).is_ok())
    });
    if *ok { Ok(()) } else { Err(PlotError::Font) }
}

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, title: &str, curves: &Curves) -> Result<(), String> {
    let text = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(text)?;
    let body = root.titled(title, ("sans-serif", 30)).map_err(text)?;
    let (loss_area, lr_area) = body.split_vertically(body.dim_in_pixel().1 * 55 / 100);
    let iterations = curves.iterations();

    let loss_range = curves.loss_range();
    let loss_decimals = decimals_for(&loss_range);
    let mut loss = ChartBuilder::on(&loss_area)
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(80)
        .build_cartesian_2d(iterations.clone(), loss_range)
        .map_err(text)?;
    loss.configure_mesh()
        .y_desc("loss")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.loss_decimals$}"))
        .label_style(("sans-serif", 16))
        .axis_desc_style(("sans-serif", 20))
        .draw()
        .map_err(text)?;
    if !curves.train_loss.is_empty() {
        let line = curves.train_loss.iter().map(|(&i, &v)| (i as f64, v));
        loss.draw_series(LineSeries::new(line, TRAIN_COLOR.stroke_width(2)))
            .map_err(text)?
            .label("train loss")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], TRAIN_COLOR.stroke_width(2)));
    }
    if !curves.eval_loss.is_empty() {
        let markers = curves.eval_loss.iter().map(|(&i, &v)| Circle::new((i as f64, v), 5, EVAL_COLOR.filled()));
        loss.draw_series(markers)
            .map_err(text)?
            .label("eval loss")
            .legend(|(x, y)| Circle::new((x + 12, y), 5, EVAL_COLOR.filled()));
    }
    loss.configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .label_font(("sans-serif", 16))
        .draw()
        .map_err(text)?;

    let lr_range = value_range(curves.learning_rate.values().chain(std::iter::once(&0.0)));
    let mut lr = ChartBuilder::on(&lr_area)
        .margin(12)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d(iterations, lr_range)
        .map_err(text)?;
    lr.configure_mesh()
        .x_desc("iteration")
        .y_desc("learning rate")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| if *y == 0.0 { "0".to_owned() } else { format!("{y:.1e}") })
        .y_labels(if curves.learning_rate.is_empty() { 0 } else { 10 })
        .label_style(("sans-serif", 16))
        .axis_desc_style(("sans-serif", 20))
        .draw()
        .map_err(text)?;
    if curves.learning_rate.is_empty() {
        let (width, height) = lr_area.dim_in_pixel();
        let centered = ("sans-serif", 20).into_text_style(&lr_area).pos(Pos::new(HPos::Center, VPos::Center));
        let note = Text::new("no learning rate in the log", (width as i32 / 2, height as i32 / 2), centered);
        lr_area.draw(&note).map_err(text)?;
    } else {
        let line = curves.learning_rate.iter().map(|(&i, &v)| (i as f64, v));
        lr.draw_series(LineSeries::new(line, LR_COLOR.stroke_width(2))).map_err(text)?;
    }
    root.present().map_err(text)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A warmup-then-cosine schedule with a decaying, noisy loss and an eval every 50 iterations.
    fn synthetic_run() -> Vec<TrainingMetrics> {
        let mut points = Vec::new();
        for iteration in 1..=300u64 {
            let t = iteration as f64;
            let lr = if t <= 15.0 {
                1e-5 * t / 15.0
            } else {
                1e-6 + 0.5 * (1e-5 - 1e-6) * (1.0 + (std::f64::consts::PI * (t - 15.0) / 285.0).cos())
            };
            let loss = 0.6 + 1.6 * (-t / 60.0).exp() + 0.05 * (t * 1.7).sin();
            points.push(TrainingMetrics { iteration, loss: Some(loss), learning_rate: Some(lr), ..Default::default() });
            if iteration % 50 == 0 {
                points.push(TrainingMetrics { iteration, loss: Some(loss + 0.1), is_eval: true, ..Default::default() });
            }
        }
        points
    }

    #[test]
    fn writes_png_and_svg() {
        let dir = tempfile::tempdir().unwrap();
        let points = synthetic_run();

        let png = dir.path().join("loss.png");
        plot_training("qwen3-8b-sft attempt 2", &points, &png).unwrap();
        let bytes = std::fs::read(&png).unwrap();
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"));
        let image = image::load_from_memory(&bytes).unwrap();
        assert_eq!((image.width(), image.height()), SIZE);

        let svg = dir.path().join("loss.SVG");
        plot_training("qwen3-8b-sft attempt 2", &points, &svg).unwrap();
        let text = std::fs::read_to_string(&svg).unwrap();
        assert!(text.contains("<svg"));
        assert!(text.contains("qwen3-8b-sft attempt 2"));
        assert!(text.contains("learning rate") && text.contains("eval loss"));
    }

    #[test]
    fn without_learning_rate_or_eval_still_draws() {
        let dir = tempfile::tempdir().unwrap();
        let points: Vec<TrainingMetrics> =
            (0..3).map(|iteration| TrainingMetrics { iteration, loss: Some(1.0), ..Default::default() }).collect();
        plot_training("flat", &points, &dir.path().join("flat.svg")).unwrap();
        plot_training("one", &points[..1], &dir.path().join("one.png")).unwrap();
    }

    #[test]
    fn rejects_other_extensions_naming_them() {
        let points = synthetic_run();
        let error = plot_training("t", &points, Path::new("/tmp/loss.jpg")).unwrap_err();
        assert!(error.to_string().contains("\"jpg\""), "{error}");
        assert!(matches!(plot_training("t", &points, Path::new("loss")), Err(PlotError::UnsupportedFormat { .. })));
    }

    #[test]
    fn rejects_points_without_loss() {
        let points = vec![
            TrainingMetrics { iteration: 1, learning_rate: Some(1e-5), ..Default::default() },
            TrainingMetrics { iteration: 2, loss: Some(f64::NAN), ..Default::default() },
        ];
        let error = plot_training("qwen3", &points, Path::new("/tmp/never-written.png")).unwrap_err();
        assert!(matches!(error, PlotError::NoLoss { .. }), "{error}");
        assert!(matches!(plot_training("qwen3", &[], Path::new("x.svg")), Err(PlotError::NoLoss { .. })));
    }

    #[test]
    fn a_replayed_iteration_keeps_the_latest_value() {
        let point = |iteration, loss| TrainingMetrics { iteration, loss: Some(loss), ..Default::default() };
        let curves = Curves::from_points(&[point(1, 3.0), point(2, 2.0), point(2, 1.5), point(3, 1.0)]);
        assert_eq!(curves.train_loss.into_iter().collect::<Vec<_>>(), [(1, 3.0), (2, 1.5), (3, 1.0)]);
    }

    #[test]
    fn flat_and_empty_ranges_get_a_width() {
        assert_eq!(padded(0.0, 0.0, 0.05), -1.0..1.0);
        assert_eq!(padded(2.0, 2.0, 0.05), 1.8..2.2);
        assert_eq!(padded(f64::INFINITY, f64::NEG_INFINITY, 0.05), 0.0..1.0);
        assert_eq!(padded(0.0, 10.0, 0.1), -1.0..11.0);
        assert_eq!((decimals_for(&(0.5..2.3)), decimals_for(&(0.61..0.63)), decimals_for(&(0.0..400.0))), (2, 4, 0));
    }
}
