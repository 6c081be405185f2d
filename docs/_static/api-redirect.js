// The API reference used to be one page (api.html#optax_guard.zclip). When an
// address names an object that is not on the page but a link on the page
// points to it (the index's tables link every name to its family page), go
// there, so that old links keep working.
document.addEventListener("DOMContentLoaded", () => {
  const id = decodeURIComponent(window.location.hash.slice(1));
  if (!id.startsWith("optax_guard.") || document.getElementById(id)) {
    return;
  }
  const link = Array.from(document.links).find(
    (a) => a.hash === "#" + id && a.pathname !== window.location.pathname,
  );
  if (link) {
    window.location.replace(link.href);
  }
});
