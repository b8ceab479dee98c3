//! The PNG: the guest workload's latency over time around an apply, one panel per patched
//! function, lucos and livepatch (and a window without apply) on the same axes.

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;
pub use plotters::style::RGBColor;
use plotters::style::{register_font, FontStyle};

/// One line: (ms from the apply's start, us) points, and the apply..done span in ms.
pub struct Trace {
    pub label: String,
    pub color: RGBColor,
    pub points: Vec<(f64, f64)>,
    pub span: Option<(f64, f64)>,
}

pub struct Panel {
    pub title: String,
    pub traces: Vec<Trace>,
}

pub const LUCOS: RGBColor = RGBColor(31, 119, 180);
pub const LIVEPATCH: RGBColor = RGBColor(214, 39, 40);
pub const IDLE: RGBColor = RGBColor(140, 140, 140);

static FONT: Once = Once::new();

/// Registers the TTF at `font` as plotters' "sans-serif" (the ab_glyph backend has no
/// system font lookup).
fn load_font(font: &Path) -> Result<(), String> {
    let bytes = std::fs::read(font).map_err(|e| {
        format!(
            "font {}: {e} (install Debian's fonts-dejavu-core, or pass --font FILE.ttf)",
            font.display()
        )
    })?;
    let mut result = Ok(());
    FONT.call_once(|| {
        // The registry keeps the font for the life of the process.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        result = register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| format!("{} is not a usable TTF font", font.display()));
    });
    result
}

pub fn draw(path: &Path, title: &str, panels: &[Panel], font: &Path) -> Result<(), String> {
    load_font(font)?;
    let height = 60 + 420 * panels.len() as u32;
    let root = BitMapBackend::new(path, (1200, height)).into_drawing_area();
    let err = |e: DrawingAreaErrorKind<_>| format!("plot {}: {e}", path.display());
    root.fill(&WHITE).map_err(err)?;
    let (top, body) = root.split_vertically(60);
    top.titled(title, ("sans-serif", 22)).map_err(err)?;
    for (area, panel) in body.split_evenly((panels.len(), 1)).iter().zip(panels) {
        draw_panel(area, panel).map_err(|e| format!("plot {}: {e}", path.display()))?;
    }
    root.present().map_err(err)?;
    Ok(())
}

fn draw_panel<DB: DrawingBackend>(area: &DrawingArea<DB, plotters::coord::Shift>, p: &Panel) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    let pts = p.traces.iter().flat_map(|t| t.points.iter());
    let (mut x0, mut x1, mut ymin, mut y1) = (f64::MAX, f64::MIN, f64::MAX, 1.0f64);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y1 = y1.max(y);
        if y > 0.0 {
            ymin = ymin.min(y);
        }
    }
    if x0 > x1 {
        (x0, x1) = (0.0, 1.0);
    }
    // From the power of ten below the smallest value (at least 1 us) to twice the largest.
    let y0 = if ymin == f64::MAX {
        1.0
    } else {
        10f64.powf(ymin.max(1.0).log10().floor())
    };
    let y1 = y1 * 2.0;
    let mut chart = ChartBuilder::on(area)
        .caption(&p.title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(x0..x1, (y0..y1).log_scale())
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("ms from the start of the apply (guest clock)")
        .y_desc("longest request latency per bucket (us)")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 15))
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(err)?;
    // Apply..done spans first, shaded, under the lines.
    for t in &p.traces {
        if let Some((a, b)) = t.span {
            let b = if b - a < (x1 - x0) / 400.0 {
                a + (x1 - x0) / 400.0
            } else {
                b
            };
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(a, y0), (b, y1)],
                    t.color.mix(0.15).filled(),
                )))
                .map_err(err)?;
            chart
                .draw_series(std::iter::once(PathElement::new(
                    vec![(a, y0), (a, y1)],
                    t.color.stroke_width(1),
                )))
                .map_err(err)?;
        }
    }
    for t in &p.traces {
        let color = t.color;
        chart
            .draw_series(LineSeries::new(
                t.points.iter().map(|&(x, y)| (x, y.max(y0))),
                color.stroke_width(2),
            ))
            .map_err(err)?
            .label(&t.label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    Ok(())
}
