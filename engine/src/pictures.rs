//! PNG pictures of a model: sample grids, reconstructions, latent traversals, the model's own
//! pictures, loss curves.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use elbo_datasets::{BatchStream, Dataset};
use elbo_models::{Input, Model};
use elbo_settings::Config;
use image::{GrayImage, ImageBuffer, Luma, Rgb, RgbImage};
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::build::binarizer;
use crate::error::{data, io, EngineError, Result};
use crate::eval::TEST_PREFIX;
use crate::run_dir::Metrics;

/// How examples are drawn: channels and side lengths.
#[derive(Debug, Clone, Copy)]
pub struct ImageShape {
    channels: usize,
    height: usize,
    width: usize,
}

impl ImageShape {
    /// `(C, H, W)` with 1 or 3 channels, `(H, W)`, or a flat vector of a square length.
    pub fn of(shape: &[usize]) -> Result<Self> {
        match *shape {
            [c @ (1 | 3), h, w] => Ok(ImageShape { channels: c, height: h, width: w }),
            [h, w] => Ok(ImageShape { channels: 1, height: h, width: w }),
            [n] if (n as f64).sqrt().fract() == 0.0 => {
                let s = (n as f64).sqrt() as usize;
                Ok(ImageShape { channels: 1, height: s, width: s })
            }
            _ => Err(EngineError::Invalid(format!("examples of shape {shape:?} are not images (expected (1|3, H, W), (H, W) or a square length)"))),
        }
    }
}

/// Writes `rows × cols` examples (row-major in `values`, each `C·H·W` in [0, 1]) as one PNG
/// with a 1-pixel gray border around each cell.
pub fn grid(values: &[f32], shape: ImageShape, cols: usize, path: &Path) -> Result<()> {
    let ImageShape {
        channels: c,
        height: h,
        width: w,
    } = shape;
    let n = values.len() / (c * h * w);
    let rows = n.div_ceil(cols.max(1));
    let (gw, gh) = ((cols * (w + 1) + 1) as u32, (rows * (h + 1) + 1) as u32);
    let px = |v: f32| (v.clamp(0.0, 1.0) * 255.0).round() as u8;
    let cell = |i: usize| ((i % cols) * (w + 1) + 1, (i / cols) * (h + 1) + 1);
    if c == 1 {
        let mut img: GrayImage = ImageBuffer::from_pixel(gw, gh, Luma([128]));
        for (i, ex) in values.chunks_exact(h * w).enumerate() {
            let (x0, y0) = cell(i);
            for (j, v) in ex.iter().enumerate() {
                img.put_pixel((x0 + j % w) as u32, (y0 + j / w) as u32, Luma([px(*v)]));
            }
        }
        img.save(path)
    } else {
        let mut img: RgbImage = ImageBuffer::from_pixel(gw, gh, Rgb([128, 128, 128]));
        for (i, ex) in values.chunks_exact(c * h * w).enumerate() {
            let (x0, y0) = cell(i);
            for j in 0..h * w {
                let rgb = [px(ex[j]), px(ex[h * w + j]), px(ex[2 * h * w + j])];
                img.put_pixel((x0 + j % w) as u32, (y0 + j / w) as u32, Rgb(rgb));
            }
        }
        img.save(path)
    }
    .map_err(|e| EngineError::Failed(format!("cannot write {}: {e}", path.display())))
}

/// Inputs above their reconstructions: `x` holds `n` examples; returns `2n` interleaved by rows
/// of `cols` (a row of inputs, then a row of their reconstructions).
fn reconstructions(model: &dyn Model, input: &Input<'_>, cols: usize) -> Result<Vec<f32>> {
    let rec = model.reconstruct(input)?.flatten_all()?.to_vec1::<f32>()?;
    let orig = input.x.flatten_all()?.to_vec1::<f32>()?;
    let dim = orig.len() / input.ids.len().max(1);
    let mut out = Vec::with_capacity(orig.len() * 2);
    for (a, b) in orig.chunks(cols * dim).zip(rec.chunks(cols * dim)) {
        out.extend_from_slice(a);
        out.extend_from_slice(b);
    }
    Ok(out)
}

/// samples.png, reconstructions.png, traversals.png (for models with a continuous latent), the
/// model's own pictures and loss.png under `run_dir/samples/`.
pub fn write_pictures(
    model: &dyn Model,
    test: &Arc<Dataset>,
    cfg: &Config,
    run_dir: &Path,
    device: &Device,
) -> Result<()> {
    let shape = match ImageShape::of(&test.schema().shape) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("no pictures: {e}");
            return Ok(());
        }
    };
    let dir = run_dir.join("samples");
    std::fs::create_dir_all(&dir).map_err(io(format!("cannot create {}", dir.display())))?;
    let (samples, cols) = draw(model, 64, cfg.run.seed, None, device)?;
    grid(&samples, shape, cols, &dir.join("samples.png"))?;
    let plan = test
        .plan(cfg.run.seed, 32, 32, false)
        .map_err(data("cannot plan the test data"))?;
    let epoch = plan
        .plan(0, 1, 0)
        .map_err(data("cannot plan the test data"))?;
    let first = BatchStream::new(test.clone(), epoch, binarizer(cfg), 0)
        .next()
        .ok_or_else(|| EngineError::Invalid("the test set is empty".into()))?
        .map_err(data("cannot read the test data"))?;
    let x = Tensor::from_slice(&first.x, (first.rows(), first.dim), device)?;
    let input = Input {
        x: &x,
        labels: &first.labels,
        ids: &first.ids,
    };
    let rec = reconstructions(model, &input, 8)?;
    grid(&rec, shape, 8, &dir.join("reconstructions.png"))?;
    let one = x.narrow(0, 0, 1)?;
    let single = Input {
        x: &one,
        labels: &first.labels[..1],
        ids: &first.ids[..1],
    };
    if let Some(trav) = model.traversals(&single, 10, 9)? {
        grid(
            &trav.flatten_all()?.to_vec1::<f32>()?,
            shape,
            9,
            &dir.join("traversals.png"),
        )?;
    }
    for picture in model.pictures(&input)? {
        let path = dir.join(format!("{}.png", picture.name));
        grid(&picture.values, shape, picture.cols, &path)?;
    }
    loss_curves(run_dir, &dir.join("loss.png"))
}

/// One curve of loss.png.
struct Curve {
    label: String,
    color: RGBAColor,
    points: Vec<(f64, f64)>,
    /// Test-set points (thick, with markers) rather than training steps.
    test: bool,
}

/// loss.png: the training objective per logged step beside the test set's, and, in a second
/// panel, every other term the model reports on both (same colour, training thin, test thick
/// with markers). Axes are `step` and nats (or the term's unit) per example; the y axis is
/// logarithmic when the values are positive and span more than a factor of 20, and a linear
/// axis leaves out the first 5% of the steps' peaks (the untrained model's loss would flatten
/// the rest).
pub fn loss_curves(run_dir: &Path, path: &Path) -> Result<()> {
    let records = Metrics::records(run_dir);
    let (train, test): (Vec<_>, Vec<_>) = records.iter().partition(|r| r.get("loss").is_some());
    let keys = |r: &serde_json::Value| -> Vec<String> {
        r.as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default()
    };
    let tested: BTreeSet<String> = test
        .iter()
        .flat_map(|r| keys(r))
        .filter_map(|k| k.strip_prefix(TEST_PREFIX).map(str::to_string))
        .collect();
    let series = |rows: &[&serde_json::Value], key: &str| -> Vec<(f64, f64)> {
        rows.iter()
            .filter_map(|r| Some((r["step"].as_f64()?, r[key].as_f64()?)))
            .filter(|p| p.1.is_finite())
            .collect()
    };
    let pair = |term: &str, i: usize| -> [Curve; 2] {
        let color = Palette99::pick(i).to_rgba();
        [
            Curve {
                label: format!("{term} (train)"),
                color,
                points: series(&train, term),
                test: false,
            },
            Curve {
                label: format!("{term} (test)"),
                color,
                points: series(&test, &format!("{TEST_PREFIX}{term}")),
                test: true,
            },
        ]
    };
    let objective: Vec<Curve> = pair("loss", 0).into_iter().collect();
    if objective[0].points.len() < 2 {
        return Ok(());
    }
    let terms: Vec<Curve> = tested
        .iter()
        .filter(|t| *t != "loss" && train.iter().any(|r| r.get(t.as_str()).is_some()))
        .enumerate()
        .flat_map(|(i, t)| pair(t, i + 1))
        .collect();
    let root = BitMapBackend::new(path, (1200, 480)).into_drawing_area();
    let draw = || -> std::result::Result<(), Box<dyn std::error::Error + '_>> {
        root.fill(&WHITE)?;
        let panels = if terms.is_empty() {
            vec![root.clone()]
        } else {
            root.split_evenly((1, 2))
        };
        panel(&panels[0], "objective", &objective)?;
        if let Some(area) = panels.get(1) {
            panel(area, "terms", &terms)?;
        }
        root.present()?;
        Ok(())
    };
    fonts();
    draw().map_err(|e| EngineError::Failed(format!("cannot draw {}: {e}", path.display())))
}

/// Registers the font the plots' text is set in (once; it is compiled in).
fn fonts() {
    static FONTS: std::sync::Once = std::sync::Once::new();
    FONTS.call_once(|| {
        if plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
            .is_err()
        {
            tracing::warn!("the plots' font cannot be loaded: their text is left out");
        }
    });
}

/// One panel of curves: linear or logarithmic y (see [`loss_curves`]).
fn panel(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    title: &str,
    curves: &[Curve],
) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let all = || curves.iter().flat_map(|c| c.points.iter().copied());
    let x0 = all().map(|p| p.0).fold(f64::INFINITY, f64::min);
    let x1 = all()
        .map(|p| p.0)
        .fold(f64::NEG_INFINITY, f64::max)
        .max(x0 + 1.0);
    let lo = all().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let hi = all().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    let settled = all()
        .filter(|p| p.0 >= x0 + 0.05 * (x1 - x0))
        .map(|p| p.1)
        .fold(f64::NEG_INFINITY, f64::max);
    let x = x0..x1;
    if lo > 0.0 && hi / lo > 20.0 {
        draw_panel(area, title, x, (lo * 0.9..hi * 1.1).log_scale(), curves)
    } else {
        let top = if settled.is_finite() { settled } else { hi };
        let pad = 0.05 * (top - lo).abs().max(1e-6);
        draw_panel(area, title, x, lo - pad..top + pad, curves)
    }
}

/// A tick label: three significant digits, no trailing zeros.
fn tick(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return format!("{v}");
    }
    let decimals = (2 - v.abs().log10().floor() as i32).clamp(0, 6) as usize;
    let text = format!("{v:.decimals$}");
    if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        text
    }
}

/// Draws one panel's axes, curves and legend on `y`, linear or logarithmic.
fn draw_panel<Y>(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    title: &str,
    x: std::ops::Range<f64>,
    y: Y,
    curves: &[Curve],
) -> std::result::Result<(), Box<dyn std::error::Error>>
where
    Y: AsRangedCoord<Value = f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(14)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(x, y)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("per example")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| tick(*v))
        .light_line_style(WHITE)
        .bold_line_style(BLACK.mix(0.12))
        .label_style(("sans-serif", 13))
        .draw()?;
    for c in curves.iter().filter(|c| !c.points.is_empty()) {
        let color = c.color;
        let style = color.stroke_width(if c.test { 2 } else { 1 });
        let points = c.points.iter().copied();
        let series = if c.test {
            LineSeries::new(points, style).point_size(3)
        } else {
            LineSeries::new(points, style)
        };
        chart
            .draw_series(series)?
            .label(c.label.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    Ok(())
}

/// Most samples one picture holds.
pub const MAX_SAMPLES: usize = 4096;

/// Most classes a grid of class rows shows (the first ones).
const MAX_CLASS_ROWS: usize = 16;

/// About `n` samples of `model` and the columns of their grid: for a model that reads labels,
/// of class `label`, or — with none — one row per class (the first 16); else unconditioned.
fn draw(
    model: &dyn Model,
    n: usize,
    seed: u64,
    label: Option<i64>,
    device: &Device,
) -> Result<(Vec<f32>, usize)> {
    let square = (n as f64).sqrt().ceil() as usize;
    let (labels, cols) = match (model.labels().classes(), label) {
        (None, None) => (None, square),
        (None, Some(_)) => {
            return Err(EngineError::Invalid(
                "--label: this model does not read labels".into(),
            ))
        }
        (Some(classes), Some(k)) if (0..classes as i64).contains(&k) => (Some(vec![k; n]), square),
        (Some(classes), Some(k)) => {
            return Err(EngineError::Invalid(format!(
                "--label {k}: expected a class in 0..{classes}"
            )))
        }
        (Some(classes), None) => {
            let rows = classes.min(MAX_CLASS_ROWS);
            let cols = (n / rows).max(1);
            let labels = (0..rows * cols).map(|i| (i / cols) as i64).collect();
            (Some(labels), cols)
        }
    };
    let count = labels.as_ref().map_or(n, Vec::len);
    let samples = model.sample(count, seed, labels.as_deref(), device)?;
    Ok((samples.flatten_all()?.to_vec1::<f32>()?, cols))
}

/// `elbo sample`: about `n` samples of a trained run's model as one PNG grid at `path` (see
/// `draw` for labels); returns how many it drew.
pub fn write_samples(
    run: &crate::eval::TrainedRun,
    n: usize,
    seed: u64,
    label: Option<i64>,
    path: &Path,
    device: &Device,
) -> Result<usize> {
    if !(1..=MAX_SAMPLES).contains(&n) {
        return Err(EngineError::Invalid(format!(
            "--n {n}: expected 1 to {MAX_SAMPLES}"
        )));
    }
    let shape = ImageShape::of(&run.test.schema().shape)?;
    let (samples, cols) = draw(run.model.as_ref(), n, seed, label, device)?;
    grid(&samples, shape, cols, path)?;
    Ok(samples.len() / run.test.schema().dim.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_labels_keep_three_significant_digits() {
        for (v, want) in [
            (0.0, "0"),
            (120.0, "120"),
            (1234.7, "1235"),
            (98.27, "98.3"),
            (1.5, "1.5"),
            (2.0, "2"),
            (0.01234, "0.0123"),
            (-45.67, "-45.7"),
        ] {
            assert_eq!(tick(v), want, "{v}");
        }
    }

    #[test]
    fn loss_curves_draw_train_and_test_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.png");
        loss_curves(dir.path(), &path).unwrap();
        assert!(!path.exists(), "no metrics, no picture");
        let mut lines = String::new();
        for step in 1..=20u64 {
            let loss = 200.0 / step as f64;
            lines += &format!(
                "{{\"step\":{step},\"epoch\":0,\"loss\":{loss},\"kl\":{},\"rec\":{}}}\n",
                loss / 10.0,
                loss * 0.9
            );
            if step % 5 == 0 {
                lines += &format!(
                    "{{\"step\":{step},\"epoch\":1,\"test_kl\":{},\"test_rec\":{}}}\n",
                    loss / 9.0,
                    loss
                );
            }
        }
        std::fs::write(dir.path().join("metrics.jsonl"), lines).unwrap();
        loss_curves(dir.path(), &path).unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (1200, 480));
        // Text and curves: far more than a white page with a frame.
        let inked = img.pixels().filter(|p| p.0 != [255, 255, 255]).count();
        assert!(inked > 10_000, "{inked} non-white pixels");
    }
}
