//! The large image viewer: the selected image with the anomaly heatmap and the abnormal region
//! outlined, zoom (wheel / pinch) and pan (drag).

use eframe::egui::{self, RichText};

use super::app::InkspectApp;
use super::style;
use crate::engine::inference::Class;

/// Renders the viewer for the selected image.
pub fn show(app: &mut InkspectApp, ui: &mut egui::Ui) {
    let Some(selected) = app.evaluation.selected else {
        ui.centered_and_justified(|ui| {
            ui.label(RichText::new("Select an image on the left to inspect it").size(16.0));
        });
        return;
    };
    ui.horizontal(|ui| {
        ui.checkbox(&mut app.evaluation.show_overlay, "Heatmap and region");
        if ui
            .button("Fit")
            .on_hover_text("Show the whole image")
            .clicked()
        {
            app.evaluation.scene_rect = egui::Rect::ZERO;
        }
        if let Some(img) = app.project.images.get(selected) {
            ui.label(img.path.display().to_string());
        }
        if app.evaluation.inspecting {
            ui.spinner();
        }
    });
    let Some(v) = &app.evaluation.viewer else {
        if !app.evaluation.inspecting {
            ui.label("No result for this image yet (is a model trained?)");
        }
        return;
    };
    if v.index != selected {
        return;
    }
    let verdict_colour = if v.inspection.class == Class::Nok {
        style::NOK
    } else {
        style::GOOD
    };
    ui.label(
        RichText::new(format!(
            "{} (ID {}) · score {:.6}",
            v.inspection.class.label(),
            v.inspection.class_id(),
            v.inspection.score
        ))
        .color(verdict_colour)
        .strong(),
    );
    let tex = if app.evaluation.show_overlay {
        &v.overlay
    } else {
        &v.plain
    };
    let size = egui::vec2(v.decoded.width as f32, v.decoded.height as f32);
    let id = tex.id();
    egui::Frame::canvas(ui.style()).show(ui, |ui| {
        ui.set_min_size(ui.available_size());
        egui::Scene::new()
            .zoom_range(0.05..=16.0)
            .show(ui, &mut app.evaluation.scene_rect, |ui| {
                ui.add(egui::Image::new((id, size)).texture_options(egui::TextureOptions::NEAREST));
            });
    });
}
