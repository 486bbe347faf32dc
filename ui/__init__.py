"""The Gradio app's parts: checked form fields, the services the tabs share, and one module per tab.

`app.py` assembles them; nothing here touches a tensor (that is the `personalization` engine's job).
"""
