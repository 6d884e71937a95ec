"""The IRA Gradio app: a module per tab, the workspace, and a job runner that trains in a child process.

The UI calls the `ira` package; `ira` never imports `ui`.
"""
