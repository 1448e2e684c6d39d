// Version uploads: drag and drop onto the file field, a progress bar while the bytes go up, and
// the server's answer (errors next to the field, or the expert's page) shown without a reload.
// Without this script the form posts as usual.
document.addEventListener("DOMContentLoaded", () => {
  const form = document.querySelector("form[data-upload]");
  if (form) {
    bindDropzone(form);
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      send(form);
    });
  }
});

function bindDropzone(form) {
  const input = form.querySelector("input[type=file]");
  const zone = form.querySelector("[data-dropzone]");
  const chosen = form.querySelector("[data-chosen]");
  const show = () => { chosen.textContent = input.files.length ? input.files[0].name : ""; };
  input.addEventListener("change", show);
  ["dragenter", "dragover"].forEach((type) => zone.addEventListener(type, (event) => {
    event.preventDefault();
    zone.classList.add("over");
  }));
  ["dragleave", "drop"].forEach((type) => zone.addEventListener(type, () => zone.classList.remove("over")));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    if (event.dataTransfer.files.length) {
      input.files = event.dataTransfer.files;
      show();
    }
  });
}

function send(form) {
  const progress = form.querySelector("[data-progress]");
  const request = new XMLHttpRequest();
  request.open("POST", form.action || window.location.href);
  request.setRequestHeader("HX-Request", "true");  // the answer to a script: where to go next
  progress.hidden = false;
  progress.value = 0;
  request.upload.addEventListener("progress", (event) => {
    if (event.lengthComputable) progress.value = (100 * event.loaded) / event.total;
  });
  request.addEventListener("load", () => {
    const next = request.getResponseHeader("HX-Redirect");
    if (request.status < 400 && next) {
      window.location.assign(next);  // the expert's page, with the new version
      return;
    }
    // Put the server's form, with its errors next to the fields, in place of this one.
    const page = new DOMParser().parseFromString(request.responseText, "text/html");
    const answer = page.querySelector("form[data-upload]");
    if (answer) {
      form.innerHTML = answer.innerHTML;
      bindDropzone(form);
    } else {
      progress.hidden = true;
      window.alert(`The upload failed (${request.status}).`);
    }
  });
  request.addEventListener("error", () => {
    progress.hidden = true;
    window.alert("The upload did not reach the server; check your connection and try again.");
  });
  request.send(new FormData(form));
}
