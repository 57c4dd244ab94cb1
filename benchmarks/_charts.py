"""Table and chart pieces shared by the suites' parts of benchmarks/render.py (matplotlib is passed in, so that
rendering the tables never needs it)."""


def markdown_row(cells):
    """One Markdown table line; a ``|`` inside a cell (e.g. a case described as parallel branches) is escaped so
    it does not split the cell."""
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def grouped_bars(ax, series, xlabels, title):
    """One group of bars per x label, one bar per ``(label, values)`` series, each bar labelled with its ratio, and
    a line at parity (1.0)."""
    width = 0.8 / max(1, len(series))
    for i, (label, values) in enumerate(series):
        bars = ax.bar([x + i * width for x in range(len(xlabels))], values, width, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=6)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(xlabels))])
    ax.set_xticklabels(xlabels, fontsize=8)
    ax.set_ylabel("baseline time / fastcnn time")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def save(plt, fig, path, dpi=110):
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
