"""Static assets of the live view (index.html, view.js), read by deploy.serve."""
