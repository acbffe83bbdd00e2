//! The Python SDK (`sdk/python`) against a real daemon with real VMs: its
//! pytest suite, and the README's SDK example run exactly as written.

mod common;

use std::process::{Command, Output};

use common::{venv_python, workspace, TestDaemon};

fn python(d: &TestDaemon, key: &str, home: &std::path::Path) -> Command {
    let mut c = Command::new(venv_python());
    c.current_dir(workspace().join("sdk/python"))
        // The working tree's SDK, not a stale installed copy.
        .env("PYTHONPATH", workspace().join("sdk/python/src"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        // No ~/.bhatti/config.yaml: it would win over the environment.
        .env("HOME", home)
        .env("BHATTI_URL", &d.url)
        .env("BHATTI_TOKEN", key)
        .env("BHATTI_TEST_PUBLIC_ADDR", &d.public_addr)
        .env("BHATTI_TEST_SOCKET", d.socket())
        .env_remove("BHATTI_SOCKET");
    c
}

fn show(o: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The first ```python block after the `<!-- sdk-example -->` marker.
fn readme_example() -> String {
    let readme = std::fs::read_to_string(workspace().join("README.md")).expect("README.md");
    let rest = readme
        .split_once("<!-- sdk-example -->")
        .expect("README marks its SDK example with <!-- sdk-example -->")
        .1;
    let code = rest.split_once("```python\n").expect("a ```python block").1;
    code.split_once("```").expect("closing fence").0.to_string()
}

#[test]
fn python_sdk_against_a_real_daemon() {
    let d = TestDaemon::start("sdk");
    let key = d.create_user("py", &["--max-sandboxes", "10"]);
    let home = tempfile::tempdir().expect("home");

    let example = readme_example();
    assert!(
        example.lines().count() <= 12,
        "the README example stays short:\n{example}"
    );
    let o = python(&d, &key, home.path())
        .args(["-c", &example])
        .output()
        .expect("run the README example");
    assert!(o.status.success(), "README example failed:\n{}", show(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("hello from python"), "{out}");
    assert!(out.contains("tick 3"), "{out}");

    let o = python(&d, &key, home.path())
        .args([
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-rs",
            "tests",
        ])
        .output()
        .expect("run pytest");
    let text = show(&o);
    println!("{text}");
    assert!(o.status.success(), "the SDK's tests failed:\n{text}");
    assert!(
        !text.contains("skipped"),
        "no SDK test may skip here:\n{text}"
    );
}
