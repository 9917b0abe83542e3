//! Real desktop notifications over D-Bus: a private session bus (`dbus-daemon --session`) with a
//! notification server of this test's own (zbus) receives what the app sends when a training ends.
//! Without a notification service the app shows its toast and carries on.
//!
//! One test function only: it sets `DBUS_SESSION_BUS_ADDRESS` for the whole process.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eframe::egui;
use egui_kittest::Harness;
use inkspect::engine::dataset::import::ImageRole;
use inkspect::engine::dataset::prepare::DatasetCache;
use inkspect::engine::demo::{DemoSpec, write_demo_dataset};
use inkspect::ui::notifications::DesktopNotifier;
use inkspect::ui::{Command, InkspectApp};

type Received = Arc<Mutex<Vec<(String, String, String)>>>;

struct FakeNotifications {
    received: Received,
    next_id: u32,
}

#[zbus::interface(name = "org.freedesktop.Notifications")]
impl FakeNotifications {
    #[allow(clippy::too_many_arguments)]
    fn notify(
        &mut self,
        app_name: String,
        _replaces_id: u32,
        _app_icon: String,
        summary: String,
        body: String,
        _actions: Vec<String>,
        _hints: HashMap<String, zbus::OwnedVariant>,
        _expire_timeout: i32,
    ) -> u32 {
        self.received
            .lock()
            .unwrap()
            .push((app_name, summary, body));
        self.next_id += 1;
        self.next_id
    }

    fn get_capabilities(&self) -> Vec<String> {
        vec!["body".into()]
    }

    #[zbus(out_args("name", "vendor", "version", "spec_version"))]
    fn get_server_information(&self) -> (String, String, String, String) {
        (
            "inkspect-test".into(),
            "test".into(),
            "1.0".into(),
            "1.2".into(),
        )
    }

    fn close_notification(&self, _id: u32) {}
}

/// Trains a tiny model in the app and waits until training ended; returns the app's state.
fn train_in_app(dir: &Path, name: &str) -> Harness<'static, InkspectApp> {
    let demo = dir.join(format!("{name}-demo"));
    write_demo_dataset(&demo, &DemoSpec::tiny()).unwrap();
    let cache = DatasetCache::in_dir(dir.join("cache"));
    let mut h = Harness::builder()
        .with_size(egui::vec2(1000.0, 700.0))
        .build_eframe(move |cc| {
            let mut app = InkspectApp::for_tests(&cc.egui_ctx, Box::new(DesktopNotifier));
            app.cache = cache;
            app
        });
    h.state_mut()
        .send(Command::SaveProjectAs(dir.join(format!("{name}.inkspect"))));
    h.state_mut().send(Command::Import {
        paths: vec![demo.join("train/good")],
        role: ImageRole::TrainGood,
    });
    let start = Instant::now();
    while h.state().import.is_some() || !h.state().queue.is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "import timed out"
        );
        h.step();
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut d = h.state().project.dataset;
    d.image_size_px = 64;
    let mut t = h.state().project.training;
    t.max_epochs = 2;
    h.state_mut().send(Command::SetDataset(d));
    h.state_mut().send(Command::SetTraining(t));
    h.state_mut().send(Command::StartTraining { resume: false });
    h.step();
    while h.state().is_training() {
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "training timed out"
        );
        h.step();
        std::thread::sleep(Duration::from_millis(20));
    }
    h.step();
    h
}

#[test]
fn finishing_a_training_sends_one_desktop_notification_and_survives_without_a_service() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("bus.sock");
    let addr = format!("unix:path={}", sock.display());
    let mut daemon = std::process::Command::new("dbus-daemon")
        .args([
            "--session",
            "--nofork",
            "--nopidfile",
            &format!("--address={addr}"),
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("dbus-daemon is installed (.ci/run installs the dbus package)");
    let start = Instant::now();
    while !sock.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "dbus-daemon did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let received: Received = Arc::default();
    let server = FakeNotifications {
        received: Arc::clone(&received),
        next_id: 0,
    };
    let _conn: zbus::Connection = zbus::block_on(async {
        zbus::connection::Builder::address(addr.as_str())
            .name("org.freedesktop.Notifications")
            .serve_at("/org/freedesktop/Notifications", server)
            .build()
            .await
    })
    .expect("the fake notification server connects");
    // SAFETY: this binary has a single test; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("DBUS_SESSION_BUS_ADDRESS", &addr) };

    let h = train_in_app(dir.path(), "wafer-line-3");
    let got = received.lock().unwrap().clone();
    assert_eq!(got.len(), 1, "exactly one notification: {got:?}");
    let (app_name, summary, body) = &got[0];
    assert_eq!(app_name, "Inkspect");
    assert!(summary.contains("wafer-line-3"), "{summary}");
    assert!(summary.contains("model ready"), "{summary}");
    assert!(body.contains("finished"), "{body}");
    drop(h);

    // No notification service: the toast still says it, and the app carries on.
    unsafe {
        std::env::set_var(
            "DBUS_SESSION_BUS_ADDRESS",
            "unix:path=/nonexistent/inkspect-bus",
        )
    };
    let h = train_in_app(dir.path(), "no-service");
    let app = h.state();
    assert!(app.project.model_path.as_ref().is_some_and(|p| p.is_file()));
    assert!(app.toasts.iter().any(|t| t.text.contains("model ready")));
    assert_eq!(received.lock().unwrap().len(), 1);
    let _ = daemon.kill();
    let _ = daemon.wait();
}
