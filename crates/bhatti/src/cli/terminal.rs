//! Terminal helpers: a raw-mode guard that always restores the terminal, and
//! prompts (visible and hidden) for `bhatti setup`.

use std::io::{self, BufRead, IsTerminal, Write};

use anyhow::Context;
use crossterm::event::{Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

/// Raw mode for as long as this value lives; dropping it (also while
/// unwinding from a panic or returning an error) restores the terminal.
#[derive(Debug)]
pub struct RawModeGuard(());

impl RawModeGuard {
    pub fn enable() -> anyhow::Result<Self> {
        crossterm::terminal::enable_raw_mode().context("cannot put the terminal into raw mode")?;
        Ok(Self(()))
    }
}

impl Drop for RawModeGuard {
    fn drop(&mut self) {
        let _ = crossterm::terminal::disable_raw_mode();
    }
}

/// Asks for a line on stderr and reads it from stdin. `Ok(None)` on end of input.
pub fn prompt_line(question: &str) -> anyhow::Result<Option<String>> {
    eprint!("{question}");
    io::stderr().flush().ok();
    let mut line = String::new();
    let n = io::stdin()
        .lock()
        .read_line(&mut line)
        .context("cannot read from stdin")?;
    if n == 0 {
        return Ok(None);
    }
    Ok(Some(line.trim().to_string()))
}

/// Like [`prompt_line`], but the answer is not echoed when stdin is a
/// terminal. `Ok(None)` on end of input or Ctrl+C / Ctrl+D.
pub fn prompt_hidden(question: &str) -> anyhow::Result<Option<String>> {
    if !io::stdin().is_terminal() {
        return prompt_line(question);
    }
    eprint!("{question}");
    io::stderr().flush().ok();
    let answer = {
        let _raw = RawModeGuard::enable()?;
        read_hidden_keys()
    };
    eprintln!();
    answer.map(|a| a.map(|s| s.trim().to_string()))
}

fn read_hidden_keys() -> anyhow::Result<Option<String>> {
    let mut s = String::new();
    loop {
        let ev = crossterm::event::read().context("cannot read from the terminal")?;
        match ev {
            Event::Key(KeyEvent {
                code,
                modifiers,
                kind: KeyEventKind::Press | KeyEventKind::Repeat,
                ..
            }) => {
                let ctrl = modifiers.contains(KeyModifiers::CONTROL);
                match code {
                    KeyCode::Enter => return Ok(Some(s)),
                    KeyCode::Char('c') if ctrl => return Ok(None),
                    KeyCode::Char('d') if ctrl && s.is_empty() => return Ok(None),
                    KeyCode::Char('u') if ctrl => s.clear(),
                    KeyCode::Char(_) if ctrl => {}
                    KeyCode::Char(c) => s.push(c),
                    KeyCode::Backspace => {
                        s.pop();
                    }
                    _ => {}
                }
            }
            Event::Paste(p) => s.push_str(&p),
            _ => {}
        }
    }
}

/// Reads stdin on a thread of its own (a blocking read of a pipe must not
/// hold up the async runtime, nor its shutdown) in chunks of up to
/// `chunk` bytes. The channel holds a few chunks, so memory stays bounded
/// whatever the size of the input; it closes at EOF or on a read error.
pub fn spawn_stdin_reader(chunk: usize) -> anyhow::Result<tokio::sync::mpsc::Receiver<Vec<u8>>> {
    use std::io::Read;
    use std::os::fd::AsFd;
    let fd = io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .context("cannot use stdin")?;
    let mut input = std::fs::File::from(fd);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            let mut buf = vec![0u8; chunk];
            loop {
                match input.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => {
                        if tx.blocking_send(buf[..n].to_vec()).is_err() {
                            return;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return,
                }
            }
        })
        .context("cannot start the stdin reader")?;
    Ok(rx)
}
