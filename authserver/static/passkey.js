// tokengate's sign-in pages: the browser's WebAuthn calls for passkeys.
// A form marked data-passkey="create" or "get" carries the server's options as JSON
// (data-options) and a hidden "credential" field. Its button asks the browser for a
// passkey, puts the answer (as the JSON of WebAuthn Level 3's toJSON()) in the field,
// and submits the form. Without this script, or without WebAuthn, the forms stay
// hidden and the page's other ways in remain.
"use strict";
(() => {
  const decode = (text) => {
    const b64 = text.replace(/-/g, "+").replace(/_/g, "/");
    const raw = atob(b64 + "=".repeat((4 - (b64.length % 4)) % 4));
    return Uint8Array.from(raw, (c) => c.charCodeAt(0)).buffer;
  };
  const encode = (buffer) => {
    const bytes = new Uint8Array(buffer);
    let raw = "";
    for (const byte of bytes) raw += String.fromCharCode(byte);
    return btoa(raw).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  };
  const descriptors = (list) => (list || []).map((c) => ({ ...c, id: decode(c.id) }));

  const creationOptions = (o) => ({
    ...o,
    challenge: decode(o.challenge),
    user: { ...o.user, id: decode(o.user.id) },
    excludeCredentials: descriptors(o.excludeCredentials),
  });
  const requestOptions = (o) => ({
    ...o,
    challenge: decode(o.challenge),
    allowCredentials: descriptors(o.allowCredentials),
  });

  const asJSON = (credential) => {
    const r = credential.response;
    const response = { clientDataJSON: encode(r.clientDataJSON) };
    if (r.attestationObject) {
      response.attestationObject = encode(r.attestationObject);
      response.transports = r.getTransports ? r.getTransports() : [];
    } else {
      response.authenticatorData = encode(r.authenticatorData);
      response.signature = encode(r.signature);
      if (r.userHandle) response.userHandle = encode(r.userHandle);
    }
    return {
      id: credential.id,
      rawId: encode(credential.rawId),
      type: credential.type,
      response,
      authenticatorAttachment: credential.authenticatorAttachment || undefined,
      clientExtensionResults: credential.getClientExtensionResults(),
    };
  };

  const explain = (error) => {
    if (error && error.name === "NotAllowedError") {
      return "The passkey request was cancelled or timed out. Try again.";
    }
    if (error && error.name === "InvalidStateError") {
      return "This device already holds a passkey for this account.";
    }
    return "This browser could not use a passkey" + (error && error.name ? ` (${error.name}).` : ".");
  };

  const supported = typeof window.PublicKeyCredential === "function" && navigator.credentials;
  for (const form of document.querySelectorAll("form[data-passkey]")) {
    if (!supported) {
      for (const note of document.querySelectorAll(".passkey-unsupported")) note.hidden = false;
      continue;
    }
    const create = form.dataset.passkey === "create";
    const options = JSON.parse(form.dataset.options);
    const button = form.querySelector(".passkey-start");
    const message = form.querySelector(".passkey-error");
    form.hidden = false;
    if (button.hasAttribute("autofocus")) button.focus();
    button.addEventListener("click", async () => {
      button.disabled = true;
      message.hidden = true;
      try {
        const credential = create
          ? await navigator.credentials.create({ publicKey: creationOptions(options) })
          : await navigator.credentials.get({ publicKey: requestOptions(options) });
        if (!credential) throw new Error("no credential");
        form.elements.credential.value = JSON.stringify(asJSON(credential));
        form.submit();
      } catch (error) {
        message.textContent = explain(error);
        message.hidden = false;
        button.disabled = false;
      }
    });
  }
})();
