//! A bar chart of one count per minute, drawn as inline SVG on the server:
//! no script, no image request, readable at any width (it scales).

use std::fmt::Write as _;

use crate::sessions::Minute;

const W: u32 = 600;
const H: u32 = 120;
/// Room under the bars for the time labels.
const AXIS: u32 = 16;

/// `title` names the chart (also its accessible name); `pick` chooses the
/// count drawn from each minute. The tallest bar is the highest count;
/// each bar's tooltip gives its minute (UTC) and count.
pub fn bars(title: &str, minutes: &[Minute], pick: impl Fn(&Minute) -> u64) -> String {
    let max = minutes.iter().map(&pick).max().unwrap_or(0);
    let total: u64 = minutes.iter().map(&pick).sum();
    let mut s = String::with_capacity(8 * 1024);
    let label = super::html::esc(&format!(
        "{title}: {total} in the last hour, at most {max} in a minute"
    ));
    let _ = write!(
        s,
        r#"<svg class="chart" viewBox="0 0 {W} {H}" role="img" aria-label="{label}"><title>{label}</title>"#
    );
    let plot = H - AXIS;
    let n = minutes.len().max(1) as u32;
    let slot = W as f64 / n as f64;
    let _ = write!(
        s,
        r##"<line x1="0" y1="{plot}" x2="{W}" y2="{plot}" stroke="#888" stroke-width="1"/>"##
    );
    for (i, m) in minutes.iter().enumerate() {
        let v = pick(m);
        if v == 0 {
            continue;
        }
        let h = ((v as f64 / max.max(1) as f64) * (plot - 4) as f64).max(1.0);
        let x = i as f64 * slot + 1.0;
        let _ = write!(
            s,
            r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{h:.1}"><title>{} UTC: {v}</title></rect>"#,
            plot as f64 - h,
            (slot - 2.0).max(1.0),
            hhmm(m.minute),
        );
    }
    if let (Some(first), Some(last)) = (minutes.first(), minutes.last()) {
        let _ = write!(
            s,
            r#"<text x="0" y="{H}" class="axis">{}</text><text x="{W}" y="{H}" text-anchor="end" class="axis">{} UTC</text><text x="2" y="11" class="axis">max {max}</text>"#,
            hhmm(first.minute),
            hhmm(last.minute)
        );
    }
    s.push_str("</svg>");
    s
}

/// `HH:MM` of a Unix minute.
fn hhmm(minute: u64) -> String {
    let m = minute % (24 * 60);
    format!("{:02}:{:02}", m / 60, m % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_bar_per_busy_minute_scaled_to_the_highest() {
        let minutes: Vec<Minute> = (0..60)
            .map(|i| Minute {
                minute: 29_000_000 + i,
                sessions: 0,
                statements: if i == 10 {
                    50
                } else if i == 59 {
                    100
                } else {
                    0
                },
            })
            .collect();
        let svg = bars("statements per minute", &minutes, |m| m.statements);
        assert_eq!(svg.matches("<rect").count(), 2);
        assert!(svg.contains("150 in the last hour, at most 100 in a minute"));
        // The highest bar fills the plot (120 - 16 - 4), the other half.
        assert!(svg.contains(r#"height="100.0""#), "{svg}");
        assert!(svg.contains(r#"height="50.0""#), "{svg}");
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        let empty = bars("x", &minutes, |m| m.sessions);
        assert_eq!(empty.matches("<rect").count(), 0);
    }
}
