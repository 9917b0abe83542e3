//! Evaluation tab: the list of test images with score and verdict, the viewer with heatmap and
//! region, the two threshold sliders (live), the per-image result and a summary (confusion matrix
//! and score histogram of good vs nok).

use eframe::egui::{self, RichText};
use egui_plot::{Bar, BarChart, Legend, Line, Plot, PlotPoints, Points, VLine};

use super::app::{Command, InkspectApp};
use super::style;
use crate::engine::dataset::import::ImageRole;
use crate::engine::inference::{Class, Thresholds, classify};
use crate::engine::metrics::{
    ConfusionMatrix, f1_best_threshold, threshold_for_escape_rate, threshold_for_false_alarm_rate,
};

/// Label of the classification-threshold slider (tests find it by this name).
pub const CLASSIFICATION_SLIDER: &str = "Classification threshold";
/// Label of the segmentation-threshold slider.
pub const SEGMENTATION_SLIDER: &str = "Segmentation threshold";

/// Renders the evaluation tab.
pub fn show(app: &mut InkspectApp, ui: &mut egui::Ui) {
    egui::Panel::left("evaluation-list")
        .resizable(true)
        .default_size(300.0)
        .show(ui, |ui| image_list(app, ui));
    egui::Panel::right("evaluation-results")
        .resizable(true)
        .default_size(340.0)
        .show(ui, |ui| {
            egui::ScrollArea::vertical()
                .id_salt("results-scroll")
                .show(ui, |ui| results(app, ui));
        });
    egui::CentralPanel::default().show(ui, |ui| super::viewer::show(app, ui));
}

/// Scores of test images split by truth: (good, nok).
pub fn scores_by_truth(app: &InkspectApp) -> (Vec<f32>, Vec<f32>) {
    let mut good = Vec::new();
    let mut nok = Vec::new();
    for (i, img) in app.project.images.iter().enumerate() {
        if let Some(Ok(s)) = app.evaluation.scores.get(&i) {
            match img.role {
                ImageRole::TestGood => good.push(*s),
                ImageRole::TestNok => nok.push(*s),
                ImageRole::TrainGood => {}
            }
        }
    }
    (good, nok)
}

fn image_list(app: &mut InkspectApp, ui: &mut egui::Ui) {
    ui.heading("Test images");
    ui.horizontal_wrapped(|ui| {
        let busy = app.import.is_some();
        if ui
            .add_enabled(!busy, egui::Button::new("Add good…"))
            .clicked()
        {
            app.dialog_import(ImageRole::TestGood, false);
        }
        if ui
            .add_enabled(!busy, egui::Button::new("Add nok…"))
            .clicked()
        {
            app.dialog_import(ImageRole::TestNok, false);
        }
    });
    let has_model = app.project.model_path.is_some();
    let scoring = app.evaluation.scoring;
    ui.horizontal(|ui| {
        if ui
            .add_enabled(
                has_model && scoring.is_none(),
                egui::Button::new(RichText::new("Run model").strong()),
            )
            .on_disabled_hover_text("Train a model first")
            .on_hover_text("Score every test image")
            .clicked()
        {
            app.send(Command::RunEvaluation);
        }
        ui.checkbox(&mut app.evaluation.sort_by_score, "Sort by score");
    });
    if let Some((done, total)) = scoring {
        ui.add(
            egui::ProgressBar::new(done as f32 / total.max(1) as f32)
                .text(format!("Scoring {done}/{total}")),
        );
    }
    ui.separator();
    let thresholds = app.thresholds();
    let mut rows: Vec<(usize, String, ImageRole, Option<f32>)> = app
        .project
        .images
        .iter()
        .enumerate()
        .filter(|(_, img)| img.role != ImageRole::TrainGood)
        .map(|(i, img)| {
            let name = img
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let score = app
                .evaluation
                .scores
                .get(&i)
                .and_then(|r| r.as_ref().ok().copied());
            (i, name, img.role, score)
        })
        .collect();
    if rows.is_empty() {
        ui.label(
            RichText::new("No test images. Add good and nok images, or drop them here.").italics(),
        );
        return;
    }
    if app.evaluation.sort_by_score {
        rows.sort_by(|a, b| {
            b.3.unwrap_or(f32::NEG_INFINITY)
                .total_cmp(&a.3.unwrap_or(f32::NEG_INFINITY))
        });
    }
    let row_h = ui.text_style_height(&egui::TextStyle::Body) + 4.0;
    egui::ScrollArea::vertical()
        .id_salt("eval-rows")
        .auto_shrink([false, false])
        .show_rows(ui, row_h, rows.len(), |ui, range| {
            for (i, name, role, score) in &rows[range] {
                let verdict = match (score, thresholds) {
                    (Some(s), Some(t)) => Some(classify(*s, t.classification)),
                    _ => None,
                };
                let selected = app.evaluation.selected == Some(*i);
                let truth = if *role == ImageRole::TestNok {
                    "nok"
                } else {
                    "good"
                };
                let text = format!(
                    "{:<22}  [{truth}]  {}  {}",
                    style::shorten(name, 22),
                    score
                        .map(|s| format!("{s:.5}"))
                        .unwrap_or_else(|| "–".into()),
                    verdict.map(|v| v.label()).unwrap_or("")
                );
                let colour = match verdict {
                    Some(Class::Nok) => style::NOK,
                    Some(Class::Good) => style::GOOD,
                    None => ui.visuals().text_color(),
                };
                if ui
                    .selectable_label(selected, RichText::new(text).color(colour).monospace())
                    .clicked()
                {
                    app.send(Command::SelectImage(*i));
                }
            }
        });
}

fn slider_range(app: &InkspectApp, t: Thresholds) -> (f32, f32) {
    let max_score = app
        .evaluation
        .scores
        .values()
        .filter_map(|r| r.as_ref().ok().copied())
        .fold(0.0f32, f32::max);
    let hi = (max_score * 1.5)
        .max(t.classification.max(t.segmentation) * 4.0)
        .max(1e-6);
    (hi / 1e4, hi)
}

fn results(app: &mut InkspectApp, ui: &mut egui::Ui) {
    let Some(current) = app.thresholds() else {
        ui.heading("Thresholds");
        ui.label("Train a model first; thresholds are suggested from the good images.");
        return;
    };
    ui.heading("Thresholds");
    let (lo, hi) = slider_range(app, current);
    let mut t = current;
    ui.add(
        egui::Slider::new(&mut t.segmentation, lo..=hi)
            .logarithmic(true)
            .text(SEGMENTATION_SLIDER)
            .custom_formatter(|v, _| format!("{v:.6}")),
    )
    .on_hover_text("Pixels whose anomaly value is at or above this form the abnormal region");
    ui.add(
        egui::Slider::new(&mut t.classification, lo..=hi)
            .logarithmic(true)
            .text(CLASSIFICATION_SLIDER)
            .custom_formatter(|v, _| format!("{v:.6}")),
    )
    .on_hover_text("Images whose anomaly score is at or above this are nok");
    if t != current {
        app.send(Command::SetThresholds(t));
    }
    ui.horizontal_wrapped(|ui| {
        if ui
            .button("Suggest")
            .on_hover_text("The model's suggestion from the validation good images (99th percentile of their scores)")
            .clicked()
        {
            app.send(Command::SuggestThresholds);
        }
        let (good, nok) = scores_by_truth(app);
        if let Some((best, _)) = f1_best_threshold(&good, &nok)
            && ui
                .button("Best F1")
                .on_hover_text("The classification threshold with the best F1 on the scored test images")
                .clicked()
        {
            app.send(Command::SetThresholds(Thresholds { classification: best, ..t }));
        }
    });
    // Threshold by a target rate, saying how many images the estimate rests on.
    ui.horizontal_wrapped(|ui| {
        ui.label("Target");
        ui.add(
            egui::DragValue::new(&mut app.evaluation.target_rate_pct)
                .range(0.0..=50.0)
                .speed(0.1)
                .suffix(" %"),
        )
        .on_hover_text("Rate for the two choices beside it");
        let (good, nok) = scores_by_truth(app);
        let rate = app.evaluation.target_rate_pct / 100.0;
        let choices = [
            (
                "False alarms",
                "good",
                "flags",
                threshold_for_false_alarm_rate(&good, rate),
            ),
            (
                "Escapes",
                "nok",
                "misses",
                threshold_for_escape_rate(&nok, rate),
            ),
        ];
        for (what, images, verb, choice) in choices {
            let Some(r) = choice else { continue };
            let rough = if (r.n_images as f64) < 10.0 / rate.max(1e-9) {
                " (few images: a rough estimate)"
            } else {
                ""
            };
            if ui
                .button(format!("{what} ≤ target ({} {images})", r.n_images))
                .on_hover_text(format!(
                    "The classification threshold that {verb} at most {:.1} % of the {} {images} \
                     test images (achieved {:.1} %){rough}",
                    100.0 * rate,
                    r.n_images,
                    100.0 * r.achieved_rate,
                ))
                .clicked()
            {
                app.send(Command::SetThresholds(Thresholds {
                    classification: r.threshold,
                    ..t
                }));
            }
        }
    });
    ui.separator();
    ui.heading("Selected image");
    match &app.evaluation.viewer {
        Some(v) if app.evaluation.selected == Some(v.index) => {
            let ins = &v.inspection;
            let colour = if ins.class == Class::Nok {
                style::NOK
            } else {
                style::GOOD
            };
            egui::Grid::new("result-grid")
                .num_columns(2)
                .show(ui, |ui| {
                    ui.label("Anomaly score");
                    ui.label(RichText::new(format!("{:.6}", ins.score)).monospace());
                    ui.end_row();
                    ui.label("Classification");
                    ui.label(
                        RichText::new(ins.class.label())
                            .color(colour)
                            .strong()
                            .size(18.0),
                    );
                    ui.end_row();
                    ui.label("Classification ID");
                    ui.label(
                        RichText::new(ins.class_id().to_string())
                            .color(colour)
                            .strong(),
                    );
                    ui.end_row();
                    ui.label("Abnormal region");
                    ui.label(format!(
                        "{} parts, {} px",
                        ins.region.components.len(),
                        ins.region.area_px
                    ));
                    ui.end_row();
                });
            for c in ins.region.components.iter().take(8) {
                ui.label(
                    RichText::new(format!(
                        "box x {} y {} w {} h {} · {} px",
                        c.bbox[0], c.bbox[1], c.bbox[2], c.bbox[3], c.area_px
                    ))
                    .monospace()
                    .size(11.0),
                );
            }
            if ins.region.components.len() > 8 {
                ui.label(format!("… and {} more", ins.region.components.len() - 8));
            }
        }
        _ if app.evaluation.inspecting => {
            ui.spinner();
        }
        _ => {
            ui.label("Click an image in the list.");
        }
    }
    ui.separator();
    summary(app, ui, current);
}

fn summary(app: &InkspectApp, ui: &mut egui::Ui, t: Thresholds) {
    ui.heading("Summary");
    let (good, nok) = scores_by_truth(app);
    if good.is_empty() && nok.is_empty() {
        ui.label("Click \"Run model\" to score the test images.");
        return;
    }
    let cm = ConfusionMatrix::at_threshold(&good, &nok, t.classification);
    egui::Grid::new("confusion")
        .num_columns(3)
        .striped(true)
        .show(ui, |ui| {
            ui.label("");
            ui.label(RichText::new("judged good").strong());
            ui.label(RichText::new("judged nok").strong());
            ui.end_row();
            ui.label(RichText::new("good").strong());
            ui.label(cm.true_good.to_string());
            ui.label(
                RichText::new(cm.false_nok.to_string()).color(if cm.false_nok > 0 {
                    style::WARN
                } else {
                    ui.visuals().text_color()
                }),
            );
            ui.end_row();
            ui.label(RichText::new("nok").strong());
            ui.label(
                RichText::new(cm.false_good.to_string()).color(if cm.false_good > 0 {
                    style::NOK
                } else {
                    ui.visuals().text_color()
                }),
            );
            ui.label(cm.true_nok.to_string());
            ui.end_row();
        });
    let pct = |v: Option<f64>| {
        v.map(|x| format!("{:.1} %", 100.0 * x))
            .unwrap_or_else(|| "–".into())
    };
    ui.label(format!(
        "False alarms {} · escapes {} · accuracy {}",
        pct(cm.false_alarm_rate()),
        pct(cm.escape_rate()),
        pct(cm.accuracy())
    ));
    if let Some(a) = crate::engine::metrics::auroc(&good, &nok) {
        ui.label(format!(
            "Image AUROC {a:.3} ({} good, {} nok)",
            good.len(),
            nok.len()
        ));
    }
    let hi = good
        .iter()
        .chain(&nok)
        .copied()
        .fold(t.classification, f32::max)
        * 1.05;
    let bins = 30usize;
    let width = f64::from(hi) / bins as f64;
    let bars = |values: &[f32]| -> Vec<Bar> {
        let h = crate::engine::metrics::histogram(values, 0.0, hi, bins);
        h.counts
            .iter()
            .enumerate()
            .map(|(i, &c)| Bar::new((i as f64 + 0.5) * width, c as f64).width(width * 0.95))
            .collect()
    };
    let good_bars = bars(&good);
    let nok_bars = bars(&nok);
    Plot::new("score-histogram")
        .height(160.0)
        .legend(Legend::default())
        .allow_scroll(false)
        .x_axis_label("anomaly score")
        .show(ui, |plot| {
            plot.bar_chart(BarChart::new("good", good_bars).color(style::GOOD));
            plot.bar_chart(BarChart::new("nok", nok_bars).color(style::NOK));
            plot.vline(
                VLine::new("classification threshold", f64::from(t.classification))
                    .color(style::THRESHOLD_LINE),
            );
        });
    if let Some(roc) = crate::engine::metrics::roc_curve(&good, &nok) {
        let curve: Vec<[f64; 2]> = roc.points.iter().map(|p| [p.fpr, p.tpr]).collect();
        let here = [
            cm.false_alarm_rate().unwrap_or(0.0),
            cm.recall().unwrap_or(0.0),
        ];
        Plot::new("roc-curve")
            .height(160.0)
            .allow_scroll(false)
            .include_x(0.0)
            .include_x(1.0)
            .include_y(0.0)
            .include_y(1.0)
            .x_axis_label("false-alarm rate")
            .y_axis_label("nok found")
            .show(ui, |plot| {
                // No banding: an ROC curve has runs of points at one x (vertical steps).
                plot.line(
                    Line::new("ROC", PlotPoints::new(curve))
                        .color(style::NOK)
                        .allow_band(false),
                );
                plot.points(
                    Points::new("at the thresholds", vec![here])
                        .radius(4.0)
                        .color(style::THRESHOLD_LINE),
                );
            });
    }
}
