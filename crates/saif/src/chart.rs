//! SVG charts of accuracies with their intervals (plotters' SVG backend), for `saif sweep` and the page alike.

use plotters::prelude::*;
use saif_engine::EngineError;

/// One point: its category on the x axis (an index into the categories), the accuracy and its interval.
#[derive(Debug, Clone, Copy)]
pub struct Point {
    pub x: usize,
    pub y: f64,
    pub low: f64,
    pub high: f64,
}

#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<Point>,
}

/// Colours that stay apart for the common forms of colour blindness (Okabe and Ito).
const PALETTE: [RGBColor; 7] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(86, 180, 233),
    RGBColor(230, 159, 0),
    RGBColor(0, 0, 0),
];

fn failed(e: impl std::fmt::Display) -> EngineError {
    EngineError::InvalidRequest(format!("drawing the chart failed: {e}"))
}

/// Accuracy (0 to 1, shown in percent) against categories, one line per series with its intervals as bars.
pub fn accuracy_chart(
    title: &str,
    x_label: &str,
    categories: &[String],
    series: &[Series],
) -> Result<String, EngineError> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (640, 400)).into_drawing_area();
        root.fill(&WHITE).map_err(failed)?;
        let n = categories.len().max(1);
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(48)
            .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), 0f64..100f64)
            .map_err(failed)?;
        chart
            .configure_mesh()
            .light_line_style(TRANSPARENT)
            .y_labels(6)
            .y_label_formatter(&|y| format!("{y:.0}"))
            .x_labels(n)
            .x_label_formatter(&|x| {
                let i = x.round();
                if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < categories.len() {
                    categories[i as usize].clone()
                } else {
                    String::new()
                }
            })
            .y_desc("loose accuracy (%)")
            .x_desc(x_label)
            .draw()
            .map_err(failed)?;
        // Series side by side around each category, so that their intervals do not hide each other.
        let spread = 0.08;
        let offset = |i: usize| (i as f64 - (series.len() as f64 - 1.0) / 2.0) * spread;
        for (i, (s, colour)) in series.iter().zip(PALETTE.iter().cycle()).enumerate() {
            let style = ShapeStyle::from(colour).stroke_width(2);
            let dx = offset(i);
            let line = s.points.iter().map(move |p| (p.x as f64 + dx, 100.0 * p.y));
            chart
                .draw_series(LineSeries::new(line, style))
                .map_err(failed)?
                .label(s.name.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
            chart
                .draw_series(s.points.iter().map(|p| {
                    ErrorBar::new_vertical(
                        p.x as f64 + dx,
                        100.0 * p.low,
                        100.0 * p.y,
                        100.0 * p.high,
                        style.filled(),
                        6,
                    )
                }))
                .map_err(failed)?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .draw()
            .map_err(failed)?;
        root.present().map_err(failed)?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_is_an_svg_with_its_labels_and_points() {
        let categories: Vec<String> = ["1", "5", "15"].iter().map(|s| s.to_string()).collect();
        let series = vec![Series {
            name: "saif".into(),
            points: (0..3).map(|x| Point { x, y: 0.1 * x as f64, low: 0.0, high: 0.3 }).collect(),
        }];
        let svg = accuracy_chart("translate-fr", "k", &categories, &series).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        for text in ["translate-fr", "saif", "loose accuracy", "15"] {
            assert!(svg.contains(text), "{text} is missing");
        }
        assert!(svg.contains("<polyline") || svg.contains("<path"), "no line drawn");
    }
}
