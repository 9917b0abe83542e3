//! Training tab: epochs and error threshold (advanced: learning rate, batch size, seed), the
//! device, Train / Cancel, progress, ETA and a live loss curve with the error threshold.

use eframe::egui::{self, RichText};
use egui_plot::{HLine, Legend, Line, Plot, PlotPoints};

use super::app::{Command, InkspectApp, TrainingOutcome};
use super::style;
use crate::engine::training::TrainingSettings;

/// Renders the training tab.
pub fn show(app: &mut InkspectApp, ui: &mut egui::Ui) {
    egui::Panel::left("training-settings")
        .resizable(true)
        .default_size(330.0)
        .show(ui, |ui| settings(app, ui));
    egui::CentralPanel::default().show(ui, |ui| progress(app, ui));
}

fn settings(app: &mut InkspectApp, ui: &mut egui::Ui) {
    ui.heading("Training");
    let running = app.is_training();
    let mut t: TrainingSettings = app.project.training;
    let in_epochs = app.project.framework.trains_in_epochs();
    ui.add_enabled_ui(!running, |ui| {
        if !in_epochs {
            ui.label(format!(
                "{} is fitted in one pass over the good images (seconds to minutes): there are \
                 no epochs, error threshold or learning rate to set.",
                app.project.framework.display_name()
            ));
        }
        if in_epochs {
        egui::Grid::new("training-grid").num_columns(2).show(ui, |ui| {
            let l = ui.label("Epochs");
            ui.add(egui::DragValue::new(&mut t.max_epochs).range(1..=100_000).speed(1.0))
                .labelled_by(l.id)
                .on_hover_text("Passes over the good images (the most that will run)");
            ui.end_row();
            let l = ui.label("Error threshold");
            ui.add(egui::DragValue::new(&mut t.error_threshold).range(0.0..=1.0).speed(0.0001).max_decimals(6))
                .labelled_by(l.id)
                .on_hover_text("Training stops at the first epoch whose validation error is at or below this (0 = run all epochs)");
            ui.end_row();
        });
        }
        egui::CollapsingHeader::new("Advanced").id_salt("training-advanced").show(ui, |ui| {
            egui::Grid::new("training-advanced-grid").num_columns(2).show(ui, |ui| {
                if in_epochs {
                    let l = ui.label("Learning rate");
                    ui.add(egui::DragValue::new(&mut t.learning_rate).range(1e-6..=1.0).speed(0.0001).max_decimals(6))
                        .labelled_by(l.id);
                    ui.end_row();
                }
                let l = ui.label("Batch size");
                ui.add(egui::DragValue::new(&mut t.batch_size).range(1..=256)).labelled_by(l.id);
                ui.end_row();
                let l = ui.label("Seed");
                ui.add(egui::DragValue::new(&mut t.seed)).labelled_by(l.id);
                ui.end_row();
            });
        });
    });
    if t != app.project.training {
        app.send(Command::SetTraining(t));
    }
    ui.add_space(style::GAP);
    let device = app.device().description;
    ui.label(format!("Device: {device}")).on_hover_text(
        "A real GPU when present (through wgpu), else the CPU. INKSPECT_DEVICE=cpu|gpu overrides.",
    );
    let counts = app.project.counts();
    ui.label(format!(
        "{} good images ({} px, complexity {})",
        counts.train_good,
        app.project.dataset.effective_size_px(),
        app.project.dataset.effective_complexity()
    ));
    ui.add_space(style::GAP);
    ui.horizontal(|ui| {
        let can_train =
            !running && counts.train_good >= crate::engine::training::MIN_TRAINING_IMAGES;
        if ui
            .add_enabled(
                can_train,
                egui::Button::new(RichText::new("Train").size(18.0)),
            )
            .on_disabled_hover_text("Import at least 2 good images first")
            .clicked()
        {
            app.send(Command::StartTraining { resume: false });
        }
        if let Some(ckpt) = app.checkpoint.as_ref().filter(|_| !running && in_epochs) {
            let label = format!(
                "Resume (epoch {} of {} done)",
                ckpt.epochs_done, app.project.training.max_epochs
            );
            if ui
                .add_enabled(can_train, egui::Button::new(label))
                .on_hover_text(
                    "Continue the interrupted training from its last finished epoch (the same \
                     images and network; raise Epochs to train longer)",
                )
                .clicked()
            {
                app.send(Command::StartTraining { resume: true });
            }
        }
        if ui
            .add_enabled(running, egui::Button::new("Cancel"))
            .clicked()
        {
            app.send(Command::CancelTraining);
        }
    });
}

fn progress(app: &mut InkspectApp, ui: &mut egui::Ui) {
    let threshold = app.project.training.error_threshold;
    let Some(view) = &app.training else {
        let intro = if app.project.framework.trains_in_epochs() {
            "Set the epochs and error threshold, then click Train. Training runs in the background: you can keep working, and a notification tells you when the model is ready."
        } else {
            "Click Train: the good images are read once and the model is ready in seconds to minutes. It runs in the background: you can keep working, and a notification tells you when the model is ready."
        };
        ui.label(RichText::new(intro).size(15.0));
        if let Some(h) = app.model_header() {
            ui.add_space(style::GAP);
            let last = h
                .training
                .history
                .last()
                .map_or(f64::NAN, |r| r.validation_loss);
            ui.label(if h.framework.trains_in_epochs() {
                format!(
                    "Current model: {}, {} epochs, {:.0} s, final validation error {last:.6}",
                    h.framework.display_name(),
                    h.training.epochs_run,
                    h.training.train_secs,
                )
            } else {
                format!(
                    "Current model: {}, fitted in {:.0} s on {} images; validation images score \
                     {last:.3} on average",
                    h.framework.display_name(),
                    h.training.train_secs,
                    h.training.n_train,
                )
            });
        }
        return;
    };
    let fitted_in_one_pass = !app.project.framework.trains_in_epochs();
    ui.heading(&view.status);
    let epochs_done = view.history.len() as u32;
    let (epoch, fraction) = match view.batch {
        Some((e, b, n)) if view.handle.is_some() => (
            e,
            ((e - 1) as f32 + b as f32 / n.max(1) as f32) / view.max_epochs.max(1) as f32,
        ),
        _ => (
            epochs_done,
            epochs_done as f32 / view.max_epochs.max(1) as f32,
        ),
    };
    let bar_text = match view.batch {
        Some((_, b, n)) if fitted_in_one_pass && view.handle.is_some() => {
            format!("Reading good images: batch {b} of {n}")
        }
        _ if fitted_in_one_pass && epochs_done > 0 => "Fitted".to_string(),
        _ => format!("Epoch {epoch} of {}", view.max_epochs),
    };
    ui.add(
        egui::ProgressBar::new(fraction.clamp(0.0, 1.0))
            .text(bar_text)
            .desired_width(ui.available_width().min(600.0)),
    );
    ui.horizontal(|ui| {
        ui.label(format!("{:.1} images/s", view.images_per_sec));
        if view.handle.is_some() {
            ui.separator();
            ui.label(format!("ETA {}", format_secs(view.eta_secs)));
        }
        if let Some(last) = view.history.last() {
            ui.separator();
            ui.label(if fitted_in_one_pass {
                format!(
                    "validation images score {:.3} on average",
                    last.validation_loss
                )
            } else {
                format!(
                    "train error {:.6} · validation error {:.6}",
                    last.train_loss, last.validation_loss
                )
            });
        }
    });
    if let Some(TrainingOutcome::Failed(msg)) = &view.outcome {
        ui.label(RichText::new(msg).color(style::NOK));
    }
    for w in &view.warnings {
        ui.label(RichText::new(w).color(style::WARN));
    }
    if fitted_in_one_pass {
        // One pass has no learning curve: say what the model is instead.
        ui.add_space(style::GAP);
        ui.label(
            "The patch memory keeps a sample of the good images' patches; an image's anomaly \
             map is each patch's distance to the nearest remembered one. The suggested \
             thresholds come from the validation images' scores (Evaluation tab).",
        );
        return;
    }
    let train: PlotPoints = view
        .history
        .iter()
        .map(|r| [f64::from(r.epoch), r.train_loss])
        .collect();
    let val: PlotPoints = view
        .history
        .iter()
        .map(|r| [f64::from(r.epoch), r.validation_loss])
        .collect();
    Plot::new("loss-curve")
        .legend(Legend::default())
        .height(ui.available_height().max(160.0) - 8.0)
        .x_axis_label("epoch")
        .y_axis_label("error (mean squared)")
        .include_x(0.0)
        .include_y(0.0)
        .allow_scroll(false)
        .show(ui, |plot| {
            plot.line(
                Line::new("train error", train)
                    .color(style::TRAIN_LOSS)
                    .width(2.0),
            );
            plot.line(
                Line::new("validation error", val)
                    .color(style::VALIDATION_LOSS)
                    .width(2.0),
            );
            if threshold > 0.0 {
                plot.hline(HLine::new("error threshold", threshold).color(style::THRESHOLD_LINE));
            }
        });
}

/// "1 h 02 min", "3 min 20 s", "12 s".
pub fn format_secs(secs: f64) -> String {
    if !secs.is_finite() {
        return "–".into();
    }
    let s = secs.round() as u64;
    if s >= 3600 {
        format!("{} h {:02} min", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{} min {:02} s", s / 60, s % 60)
    } else {
        format!("{s} s")
    }
}
