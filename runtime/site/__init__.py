"""Before first use at a new site (docs/site.md): the folder-level shift check (``shift``: are a
scan's films unlike the training films, from the model's stored reference), the reference's
making (``shift_reference``: ``cxr-infer shift-reference``), measuring a model on the site's own
labelled films (``validate``: ``cxr-infer validate``) and fitting a site model from them
(``adapt``: ``cxr-infer adapt``); ``site_cli`` holds those three commands. Only ``site_cli`` is
imported when ``cxr-infer`` starts, and it imports click alone; the rest load on use.
"""
