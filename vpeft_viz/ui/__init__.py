"""Streamlit widgets and cached loaders (the only library code importing streamlit).

Importing this package switches a fresh server out of Streamlit's classic ``pages/`` mode.
The home script (``app.py``) declares the navigation with ``st.navigation`` (so it can be
labelled "Home"), but Streamlit decides per *process*, when the first session starts, to
run in the classic mode because a ``pages/`` folder exists, and leaves that mode only once
``st.navigation`` has been called. A first visitor arriving on a shared deep link
(``/Compare?task=...``) would run the page alone, in the classic mode, with the home page
listed as "app". Every page imports this package, so the first such run switches the mode
off and reruns, and the home script's navigation takes over from then on.
"""

from __future__ import annotations

import streamlit as st


def _leave_classic_pages_mode() -> None:
    try:
        from streamlit.runtime.pages_manager import PagesManager
    except ImportError:  # a Streamlit without the classic mode: nothing to leave
        return
    if PagesManager.uses_pages_directory and st.runtime.exists():
        PagesManager.uses_pages_directory = False
        st.rerun()


_leave_classic_pages_mode()
