//! Dataset tab: import buttons (files, folders, drag and drop), counts, a thumbnail grid, image
//! size and complexity, and a preview of an image before and after downscaling.

use eframe::egui::{self, RichText};

use super::app::{Command, InkspectApp};
use super::style;
use super::thumbnails::color_image;
use crate::engine::dataset::decode::decode_image;
use crate::engine::dataset::import::ImageRole;
use crate::engine::dataset::prepare::{COMPLEXITY_RANGE, DatasetSettings, IMAGE_SIZE_RANGE_PX};
use crate::engine::model::autoencoder_spec_for;

/// Renders the dataset tab.
pub fn show(app: &mut InkspectApp, ui: &mut egui::Ui) {
    egui::Panel::right("dataset-settings")
        .resizable(true)
        .default_size(360.0)
        .show(ui, |ui| {
            egui::ScrollArea::vertical().show(ui, |ui| settings(app, ui));
        });
    egui::CentralPanel::default().show(ui, |ui| images(app, ui));
}

fn settings(app: &mut InkspectApp, ui: &mut egui::Ui) {
    ui.heading("Training images");
    let mut d = app.project.dataset;
    egui::Grid::new("dataset-grid").num_columns(2).show(ui, |ui| {
        let l = ui.label("Image size (px)");
        ui.add(
            egui::DragValue::new(&mut d.image_size_px)
                .range(*IMAGE_SIZE_RANGE_PX.start()..=*IMAGE_SIZE_RANGE_PX.end())
                .speed(4.0)
                .suffix(" px"),
        )
        .labelled_by(l.id)
        .on_hover_text("Images are downscaled to this square size for training (rounded to a multiple of 16)");
        ui.end_row();
        let l = ui.label("Complexity");
        ui.add(egui::Slider::new(&mut d.complexity, *COMPLEXITY_RANGE.start()..=*COMPLEXITY_RANGE.end()))
            .labelled_by(l.id)
            .on_hover_text("Model capacity: higher finds finer detail but trains slower");
        ui.end_row();
    });
    if d != app.project.dataset {
        app.send(Command::SetDataset(d));
    }
    let size = d.effective_size_px();
    let mode = app.project.training_mode();
    let spec = autoencoder_spec_for(d.effective_complexity(), mode.channels());
    ui.label(format!(
        "Trains at {size} × {size} px, {} · {} parameters",
        if mode.channels() == 1 {
            "mono"
        } else {
            "colour"
        },
        spec.parameter_count()
    ));
    ui.add_space(style::GAP);
    ui.heading("Preview");
    ui.label("Left: original. Right: what the model sees. Defects must stay visible on the right.");
    preview(app, ui, &d);
}

fn preview(app: &mut InkspectApp, ui: &mut egui::Ui, d: &DatasetSettings) {
    let index = app
        .dataset_selection
        .iter()
        .next()
        .copied()
        .or_else(|| (!app.project.images.is_empty()).then_some(0));
    let Some(index) = index else {
        ui.label(RichText::new("Import images to see a preview").italics());
        return;
    };
    let size = d.effective_size_px();
    let key = (index, size);
    let mut failed: Option<String> = None;
    if app.preview.as_ref().map(|p| p.0) != Some(key) {
        match &app.preview_job {
            Some((k, rx)) if *k == key => match rx.try_recv() {
                Ok(Ok((original, small))) => {
                    let original = ui.ctx().load_texture(
                        "preview-original",
                        original,
                        egui::TextureOptions::LINEAR,
                    );
                    // Nearest filtering: the user sees the real pixels of the downscaled image.
                    let downscaled = ui.ctx().load_texture(
                        "preview-downscaled",
                        small,
                        egui::TextureOptions::NEAREST,
                    );
                    app.preview = Some((key, original, downscaled));
                    app.preview_job = None;
                }
                Ok(Err(e)) => failed = Some(e),
                Err(_) => {}
            },
            _ => {
                if let Some(img) = app.project.images.get(index) {
                    app.preview_job = Some((key, spawn_preview(ui.ctx(), img.path.clone(), size)));
                }
            }
        }
    }
    if app.preview.as_ref().map(|p| p.0) != Some(key) {
        match failed {
            Some(e) => ui.label(RichText::new(e).color(style::WARN)),
            None => ui.label(RichText::new("Loading preview…").italics()),
        };
        return;
    }
    if let Some((_, original, downscaled)) = &app.preview {
        let w = ((ui.available_width() - 8.0) / 2.0).max(60.0);
        let aspect = original.size()[1] as f32 / original.size()[0] as f32;
        ui.horizontal(|ui| {
            ui.add(egui::Image::new((original.id(), egui::vec2(w, w * aspect))));
            ui.add(egui::Image::new((
                downscaled.id(),
                egui::vec2(w, w * aspect),
            )));
        });
        if let Some(img) = app.project.images.get(index) {
            ui.label(format!(
                "{} · {} × {} px to {size} × {size} px",
                img.path
                    .file_name()
                    .map(|n| n.to_string_lossy())
                    .unwrap_or_default(),
                img.width,
                img.height
            ));
        }
    }
}

/// Decodes `path` and downscales it to `size` on a worker thread (large camera images take tens
/// of milliseconds: not on the UI thread).
fn spawn_preview(
    ctx: &egui::Context,
    path: std::path::PathBuf,
    size: u32,
) -> std::sync::mpsc::Receiver<super::app::PreviewResult> {
    let (tx, rx) = std::sync::mpsc::channel();
    let ctx = ctx.clone();
    std::thread::spawn(move || {
        let result = decode_image(&path)
            .map_err(|e| e.to_string())
            .map(|decoded| (color_image(&decoded), color_image(&decoded.resized(size))));
        let _ = tx.send(result);
        ctx.request_repaint();
    });
    rx
}

fn images(app: &mut InkspectApp, ui: &mut egui::Ui) {
    ui.horizontal_wrapped(|ui| {
        let busy = app.import.is_some();
        if ui
            .add_enabled(!busy, egui::Button::new("Import good images…"))
            .clicked()
        {
            app.dialog_import(ImageRole::TrainGood, false);
        }
        if ui
            .add_enabled(!busy, egui::Button::new("Import folder…"))
            .clicked()
        {
            app.dialog_import(ImageRole::TrainGood, true);
        }
        ui.separator();
        if ui
            .add_enabled(!busy, egui::Button::new("Import test good…"))
            .clicked()
        {
            app.dialog_import(ImageRole::TestGood, false);
        }
        if ui
            .add_enabled(!busy, egui::Button::new("Import test nok…"))
            .clicked()
        {
            app.dialog_import(ImageRole::TestNok, false);
        }
        if ui
            .add_enabled(!busy, egui::Button::new("Import MVTec folder…"))
            .on_hover_text("A folder with train/good, test/<kind> and ground_truth/<kind> (masks)")
            .clicked()
        {
            app.dialog_import(ImageRole::TrainGood, true);
        }
    });
    let counts = app.project.counts();
    ui.label(format!(
        "{} good training images · {} good test images · {} nok test images. Drop files or folders anywhere to add good images.",
        counts.train_good, counts.test_good, counts.test_nok
    ));
    if let Some(task) = &app.import {
        let (done, total) = task.progress.lock().map(|p| *p).unwrap_or((0, 0));
        ui.horizontal(|ui| {
            ui.add(
                egui::ProgressBar::new(if total == 0 {
                    0.0
                } else {
                    done as f32 / total as f32
                })
                .text(format!("Importing {done}/{total}"))
                .desired_width(300.0),
            );
            if ui.button("Cancel import").clicked() {
                app.send(Command::CancelImport);
            }
        });
    }
    if !app.import_failures.is_empty() {
        egui::CollapsingHeader::new(
            RichText::new(format!(
                "{} files could not be imported",
                app.import_failures.len()
            ))
            .color(style::WARN),
        )
        .id_salt("import-failures")
        .show(ui, |ui| {
            egui::ScrollArea::vertical()
                .max_height(120.0)
                .id_salt("failures")
                .show(ui, |ui| {
                    for f in &app.import_failures {
                        ui.label(&f.reason);
                    }
                });
            if ui.button("Clear list").clicked() {
                app.import_failures.clear();
            }
        });
    }
    ui.horizontal(|ui| {
        let n = app.dataset_selection.len();
        if ui
            .add_enabled(n > 0, egui::Button::new(format!("Remove selected ({n})")))
            .clicked()
        {
            app.send(Command::RemoveImages(
                app.dataset_selection.iter().copied().collect(),
            ));
        }
        if n > 0 && ui.button("Clear selection").clicked() {
            app.dataset_selection.clear();
        }
    });
    ui.separator();
    thumbnail_grid(app, ui);
}

fn thumbnail_grid(app: &mut InkspectApp, ui: &mut egui::Ui) {
    let n = app.project.images.len();
    if n == 0 {
        ui.centered_and_justified(|ui| {
            ui.label(
                RichText::new(
                    "No images yet.\nClick \"Import good images…\" or drop a folder here.",
                )
                .size(18.0),
            );
        });
        return;
    }
    let cell = style::THUMB_PX + 10.0;
    let per_row = ((ui.available_width() / cell).floor() as usize).max(1);
    let rows = n.div_ceil(per_row);
    egui::ScrollArea::vertical()
        .id_salt("thumbs")
        .auto_shrink([false, false])
        .show_rows(ui, cell + 14.0, rows, |ui, range| {
            for row in range {
                ui.horizontal(|ui| {
                    for i in row * per_row..((row + 1) * per_row).min(n) {
                        let (path, role) = {
                            let img = &app.project.images[i];
                            (img.path.clone(), img.role)
                        };
                        let selected = app.dataset_selection.contains(&i);
                        ui.vertical(|ui| {
                            ui.set_width(cell);
                            let size = egui::vec2(style::THUMB_PX, style::THUMB_PX);
                            let resp = match app.thumbnails.get(&path) {
                                Some(tex) => {
                                    let ts = tex.size_vec2();
                                    let scale = (style::THUMB_PX / ts.x.max(ts.y)).min(4.0);
                                    ui.add(
                                        egui::Image::new((tex.id(), ts * scale))
                                            .sense(egui::Sense::click()),
                                    )
                                }
                                None => {
                                    let (rect, resp) =
                                        ui.allocate_exact_size(size, egui::Sense::click());
                                    ui.painter().rect_filled(
                                        rect,
                                        2.0,
                                        ui.visuals().faint_bg_color,
                                    );
                                    if app.thumbnails.error(&path).is_some() {
                                        ui.painter().text(
                                            rect.center(),
                                            egui::Align2::CENTER_CENTER,
                                            "unreadable",
                                            egui::FontId::proportional(11.0),
                                            style::WARN,
                                        );
                                    }
                                    resp
                                }
                            };
                            if selected {
                                ui.painter().rect_stroke(
                                    resp.rect.expand(2.0),
                                    2.0,
                                    egui::Stroke::new(2.0, ui.visuals().selection.stroke.color),
                                    egui::StrokeKind::Outside,
                                );
                            }
                            let name = path
                                .file_name()
                                .map(|n| n.to_string_lossy().into_owned())
                                .unwrap_or_default();
                            let resp =
                                resp.on_hover_text(format!("{}\n{}", path.display(), role.label()));
                            if resp.clicked() {
                                if selected {
                                    app.dataset_selection.remove(&i);
                                } else {
                                    app.dataset_selection.insert(i);
                                }
                            }
                            let colour = match role {
                                ImageRole::TestNok => style::NOK,
                                ImageRole::TestGood => style::GOOD,
                                ImageRole::TrainGood => ui.visuals().text_color(),
                            };
                            ui.add(
                                egui::Label::new(
                                    RichText::new(style::shorten(&name, 16))
                                        .size(10.0)
                                        .color(colour),
                                )
                                .truncate(),
                            );
                        });
                    }
                });
            }
        });
}
