//! The desktop app (eframe/egui): a thin view over the engine. Tabs render state and queue
//! [`app::Command`]s; the app applies them once per frame and drains background events.

pub mod app;
pub mod dataset_tab;
pub mod evaluation_tab;
pub mod notifications;
pub mod style;
pub mod thumbnails;
pub mod training_tab;
pub mod viewer;

use std::path::PathBuf;

pub use app::{Command, InkspectApp, Tab};

/// Window options: wgpu renderer, a sensible size, drag and drop on.
pub fn native_options() -> eframe::NativeOptions {
    eframe::NativeOptions {
        renderer: eframe::Renderer::Wgpu,
        viewport: eframe::egui::ViewportBuilder::default()
            .with_title("Inkspect")
            .with_inner_size([1280.0, 820.0])
            .with_min_inner_size([800.0, 520.0])
            .with_drag_and_drop(true)
            .with_app_id("inkspect"),
        ..Default::default()
    }
}

/// Opens the app on `project` (a project file), or on nothing.
pub fn run_app(project: Option<PathBuf>) -> eframe::Result {
    eframe::run_native(
        "Inkspect",
        native_options(),
        Box::new(move |cc| {
            let mut app = InkspectApp::new(cc, Box::new(notifications::DesktopNotifier));
            if let Some(path) = project {
                app.send(Command::OpenProject(path));
            }
            Ok(Box::new(app))
        }),
    )
}
