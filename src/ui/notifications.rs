//! Desktop notifications behind a small trait, so tests can observe them and a machine without a
//! notification service degrades to the in-app toast.

/// Something that can show a desktop notification.
pub trait Notifier: Send {
    /// Shows a notification; an error says why it could not be shown.
    fn notify(&self, summary: &str, body: &str) -> Result<(), String>;
}

/// Real desktop notifications over D-Bus (notify-rust).
#[derive(Debug, Default, Clone, Copy)]
pub struct DesktopNotifier;

impl Notifier for DesktopNotifier {
    fn notify(&self, summary: &str, body: &str) -> Result<(), String> {
        notify_rust::Notification::new()
            .appname("Inkspect")
            .summary(summary)
            .body(body)
            .icon("dialog-information")
            .timeout(notify_rust::Timeout::Milliseconds(8000))
            .show()
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}
