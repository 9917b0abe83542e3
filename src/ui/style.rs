//! Design tokens: colours and spacing in one place.

use eframe::egui::Color32;

/// Colour of "good" verdicts.
pub const GOOD: Color32 = Color32::from_rgb(60, 170, 90);
/// Colour of "nok" verdicts.
pub const NOK: Color32 = Color32::from_rgb(220, 60, 60);
/// Colour of warnings.
pub const WARN: Color32 = Color32::from_rgb(230, 160, 40);
/// Training loss line.
pub const TRAIN_LOSS: Color32 = Color32::from_rgb(90, 150, 240);
/// Validation loss line.
pub const VALIDATION_LOSS: Color32 = Color32::from_rgb(240, 150, 60);
/// Error-threshold line.
pub const THRESHOLD_LINE: Color32 = Color32::from_rgb(220, 60, 60);
/// Thumbnail side in points.
pub const THUMB_PX: f32 = 96.0;
/// Space between groups.
pub const GAP: f32 = 8.0;

/// `s` shortened to at most `max` characters, ending in "…" when cut.
pub fn shorten(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let head: String = s.chars().take(max.saturating_sub(1)).collect();
        format!("{head}…")
    }
}
