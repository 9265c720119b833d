"""Reports of finished runs: runs and their groups, statistics, sections, studies, figures,
scaling fits and tables, rendered to Markdown and HTML (no torch)."""
