// The web terminal of `bhatti share`: xterm.js attached over a WebSocket to
// the sandbox's TTY sessions (the same ones `bhatti shell` uses).
//
// The share token comes from the URL fragment (#token=…), which browsers
// never send to the server, and travels as the first WebSocket message.
(function () {
  'use strict';

  // xterm.js adds <style> elements at run time; the page's CSP only lets
  // styles in with this response's nonce, so give it to them.
  const nonceMeta = document.querySelector('meta[name="bhatti-style-nonce"]');
  const nonce = nonceMeta ? nonceMeta.content : '';
  const createElement = Document.prototype.createElement;
  Document.prototype.createElement = function (name, options) {
    const el = createElement.call(this, name, options);
    if (String(name).toLowerCase() === 'style') {
      el.nonce = nonce;
    }
    return el;
  };

  const statusEl = document.getElementById('status');
  function setStatus(text, state) {
    statusEl.textContent = text;
    document.body.dataset.state = state;
  }

  const params = new URLSearchParams(window.location.hash.slice(1));
  const token = params.get('token');
  const session = params.get('session');
  const parts = window.location.pathname.split('/').filter(Boolean);
  const sandbox = decodeURIComponent(parts[parts.length - 1] || '');
  if (!token) {
    setStatus('This link has no token: ask for a new one (bhatti share).', 'error');
    return;
  }

  const term = new window.Terminal({ cursorBlink: true, scrollback: 10000 });
  const fit = new window.FitAddon.FitAddon();
  term.loadAddon(fit);
  term.open(document.getElementById('terminal'));
  fit.fit();

  const scheme = window.location.protocol === 'https:' ? 'wss:' : 'ws:';
  const ws = new WebSocket(scheme + '//' + window.location.host + '/_shell/' + encodeURIComponent(sandbox) + '/ws');
  ws.binaryType = 'arraybuffer';
  const encoder = new TextEncoder();
  let refused = false;

  ws.onopen = function () {
    const auth = { type: 'auth', token: token, rows: term.rows, cols: term.cols };
    if (session) {
      auth.session = session;
    }
    ws.send(JSON.stringify(auth));
    setStatus('Connecting…', 'connecting');
  };
  ws.onmessage = function (ev) {
    if (typeof ev.data !== 'string') {
      term.write(new Uint8Array(ev.data));
      return;
    }
    let msg;
    try {
      msg = JSON.parse(ev.data);
    } catch (e) {
      return;
    }
    if (msg.type === 'session') {
      setStatus('Connected to ' + sandbox + ' (session ' + msg.session_id + ')', 'connected');
    } else if (msg.type === 'exit') {
      setStatus('The shell exited (' + msg.exit_code + ').', 'closed');
    } else if (msg.type === 'error') {
      refused = true;
      setStatus(msg.message, 'error');
    }
  };
  ws.onclose = function (ev) {
    term.options.disableStdin = true;
    if (!refused && document.body.dataset.state !== 'closed') {
      setStatus('Disconnected' + (ev.reason ? ': ' + ev.reason : '') + '.', 'closed');
    }
  };

  function send(data) {
    if (ws.readyState === WebSocket.OPEN) {
      ws.send(data);
    }
  }
  term.onData(function (d) { send(encoder.encode(d)); });
  term.onBinary(function (d) { send(Uint8Array.from(d, function (c) { return c.charCodeAt(0) & 0xff; })); });
  term.onResize(function (size) {
    send(JSON.stringify({ type: 'resize', rows: size.rows, cols: size.cols }));
  });
  window.addEventListener('resize', function () { fit.fit(); });
  term.focus();
}());
