"""A griffe extension for the API reference: our docstrings are reST, as torch.optim's (Sphinx
roles, ``.. math::``, tables), and mkdocstrings renders Markdown, so each is converted first.
Google-style sections (``Args:``) pass through for griffe to parse."""

import griffe
from docstring_to_markdown.rst import rst_to_markdown


class RstToMarkdown(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rst_to_markdown(obj.docstring.value, extract_signature=False)
