"""Assets of the live view: the Jinja2 template ``index.html`` and the page's script ``view.js``,
read by :mod:`deploy.http.view`."""
