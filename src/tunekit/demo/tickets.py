"""Synthetic support tickets for the quickstart demo: free text in, Northwind's triage record out.

Northwind Cloud is a fictional company. Its triage taxonomy (intent names such as
`technical.outage`, product ids such as `web_portal`) is private, so a base model cannot guess the
exact strings and scores near zero, while a small LoRA fine-tune learns them from a few hundred rows.
For that to work the record must follow from the text alone:

- intent: from the problem sentence; each intent has its own problem templates and details.
- product: from exactly one product name; every product has several surface names.
- priority: P1 when the ticket carries an urgency cue (urgent, ASAP, losing money, all users...),
  P3 when it carries a no-hurry cue (no rush, whenever, low priority...), P2 when it carries a
  normal-priority cue (this week, soon, a workaround...). A ticket carries exactly one kind: an
  absent cue is a weak signal that a small model learns slowly (measured: P2 without a cue of
  its own was the quickstart's main error, exact match 0.55 after one epoch).

Everything else (greetings, names, order numbers, dates, closings, the odd typo) varies freely and
carries no signal. A generated row (`generate(800, 0)[0]`):

    {"messages": [
      {"role": "system", "content": "Triage this Northwind Cloud support ticket into a JSON record
                                     with the keys intent, priority and product."},
      {"role": "user", "content": "Good morning, my name is Mateo Becker. The export button in the
                                   app on my phone does nothing when I click it. It started last
                                   night. Please look into it this week. Appreciate your help."},
      {"role": "assistant", "content": "{\\"intent\\": \\"technical.bug\\", \\"priority\\": \\"P2\\",
                                        \\"product\\": \\"mobile_app\\"}"}]}

(wrapped here; each content is one line in the file).

Write a file with `python -m tunekit.demo.tickets --out tickets.jsonl [--n 800] [--seed 0]`.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

from tunekit.io import atomic_write_jsonl

SYSTEM_PROMPT = "Triage this Northwind Cloud support ticket into a JSON record with the keys intent, priority and product."

# The shipped copy of generate(800, 0); a test keeps it equal to the generator.
SHIPPED_PATH = Path(__file__).parent / "data" / "tickets.jsonl"

INTENTS: tuple[str, ...] = (
    "billing.refund",
    "billing.invoice",
    "account.login",
    "account.delete",
    "shipping.delay",
    "shipping.damaged",
    "technical.bug",
    "technical.outage",
)
PRIORITIES: tuple[str, ...] = ("P1", "P2", "P3")
# Share of each priority. P2 is the default and the most common, as in a real queue.
PRIORITY_WEIGHTS: tuple[float, ...] = (0.3, 0.4, 0.3)

# Product id -> the noun phrases customers use for it (determiner included, so templates can
# use them anywhere). No phrase is a substring of another product's phrase, so a ticket names
# exactly one product.
PRODUCTS: dict[str, tuple[str, ...]] = {
    "mobile_app": (
        "the iPhone app",
        "the Android app",
        "the app on my phone",
        "the mobile app",
        "the Northwind app on my iPad",
        "the iOS app",
        "your phone app",
    ),
    "web_portal": (
        "the web portal",
        "the online dashboard",
        "your website",
        "the customer portal",
        "the admin console in my browser",
        "the web dashboard",
    ),
    "api": (
        "the API",
        "the REST API",
        "your public API",
        "our API integration",
        "the v2 API",
        "the Python SDK",
    ),
    "router": (
        "the Northwind router",
        "my Wi-Fi router",
        "the mesh router",
        "the NW-300 router",
        "the router you sent me",
        "my mesh Wi-Fi system",
    ),
    "camera": (
        "the security camera",
        "my doorbell camera",
        "the outdoor cam",
        "the Northwind Cam",
        "the indoor camera",
        "my CamPro 2",
    ),
}
SOFTWARE = ("mobile_app", "web_portal", "api")
HARDWARE = ("router", "camera")
EVERYTHING = SOFTWARE + HARDWARE

# Intent -> (template, products it makes sense for). A template names the product once as
# {product}; the other slots ({amount}, {date}, ...) are filled per ticket by _slots().
ISSUES: dict[str, list[tuple[str, tuple[str, ...]]]] = {
    "billing.refund": [
        ("I was charged twice for {product} this month and would like a refund.", EVERYTHING),
        ("Please refund the {amount} you charged me for {product}.", EVERYTHING),
        ("I cancelled {product} {day} but still got billed, can I get my money back?", SOFTWARE),
        ("I'd like a refund for {product}, I was charged after my trial ended.", SOFTWARE),
        ("You billed me {amount} for {product} that I never signed up for, please reverse it.", EVERYTHING),
        ("Requesting a refund for my purchase of {product} from {date}.", HARDWARE),
        ("There is a duplicate charge of {amount} for {product} on my card, please refund one.", EVERYTHING),
        ("Can I get my money back for {product}? I was overcharged by {amount}.", EVERYTHING),
        ("I returned {product} {day} and still have not been refunded.", HARDWARE),
        ("The renewal for {product} went through after I cancelled, please refund it.", SOFTWARE),
    ],
    "billing.invoice": [
        ("I need a copy of the invoice for {product} from {date}.", EVERYTHING),
        ("Can you resend the invoice for {product}? It never reached my inbox.", EVERYTHING),
        ("The invoice for {product} has the wrong company name on it, could you correct it?", EVERYTHING),
        ("Where can I download past invoices for {product}?", EVERYTHING),
        ("Our accounting team needs a VAT invoice for {product}.", EVERYTHING),
        ("Please add our tax ID to the invoice for {product}.", EVERYTHING),
        ("I need an itemized receipt for {product} for my expense report.", EVERYTHING),
        ("Could you change the billing address on the invoice for {product}?", EVERYTHING),
        ("The line items on the invoice for {product} are confusing, what is each one for?", EVERYTHING),
    ],
    "account.login": [
        ("I can't log in to {product}, it keeps saying my password is wrong.", SOFTWARE[:2]),
        ("The password reset email for {product} never arrives.", SOFTWARE[:2]),
        ("I'm locked out of {product} after too many sign-in attempts.", SOFTWARE[:2]),
        ("My two-factor code is rejected every time I sign in to {product}.", SOFTWARE[:2]),
        ("Signing in to {product} just sends me back to the login page.", SOFTWARE[:2]),
        ("{product} says my account does not exist when I try to log in.", SOFTWARE[:2]),
        ("I forgot my password for {product} and the reset link has expired.", SOFTWARE[:2]),
        ("My SSO login to {product} fails with an invalid credentials message.", SOFTWARE[:2]),
    ],
    "account.delete": [
        ("Please delete my account and all data linked to {product}.", EVERYTHING),
        ("How do I delete my account? I no longer use {product}.", EVERYTHING),
        ("Please remove my profile and personal data, I have stopped using {product}.", EVERYTHING),
        ("I'd like my account erased under GDPR, I don't use {product} anymore.", EVERYTHING),
        ("Close my account please, we have moved away from {product}.", EVERYTHING),
        ("I want to delete my account but there is no option for it in {product}.", SOFTWARE),
        ("Please wipe my data and permanently close the account I use for {product}.", EVERYTHING),
    ],
    "shipping.delay": [
        ("My order for {product} still hasn't arrived after two weeks.", HARDWARE),
        ("I ordered {product} {day} and it hasn't shipped yet.", HARDWARE),
        ("The tracking for {product} hasn't updated in days.", HARDWARE),
        ("Where is {product}? The delivery date was {date} and nothing came.", HARDWARE),
        ("{product} was supposed to be delivered {day} but it is still not here.", HARDWARE),
        ("My package with {product} seems stuck in transit.", HARDWARE),
        ("It has been ten days since I ordered {product} and I still haven't received it.", HARDWARE),
    ],
    "shipping.damaged": [
        ("{product} arrived with a cracked case.", HARDWARE),
        ("The box was crushed and {product} inside is broken.", HARDWARE),
        ("{product} came damaged, the power port is bent.", HARDWARE),
        ("I just unpacked {product} and the casing is smashed.", HARDWARE),
        ("Please send a replacement, {product} arrived dented and scratched.", HARDWARE),
        ("{product} showed up broken and the mounting bracket is snapped in half.", HARDWARE),
        ("The package was torn open and {product} was rattling loose with parts missing.", HARDWARE),
    ],
    "technical.bug": [
        ("The export button in {product} does nothing when I click it.", SOFTWARE[:2]),
        ("{product} crashes every time I open the settings page.", SOFTWARE[:2]),
        ("{product} shows the wrong time zone on every entry.", SOFTWARE[:2]),
        ("Search in {product} returns no results even for exact names.", SOFTWARE[:2]),
        ("{product} returns the wrong totals in the monthly usage report.", SOFTWARE),
        ("Pagination in {product} skips some records when there are more than 100.", SOFTWARE),
        ("After the last update {product} keeps forgetting my settings.", EVERYTHING),
        ("Notifications from {product} arrive twice.", EVERYTHING),
        ("{product} reboots by itself every few hours.", HARDWARE),
        ("The night mode on {product} turns itself off after a minute.", HARDWARE),
    ],
    "technical.outage": [
        ("{product} is completely down, nothing loads.", SOFTWARE),
        ("We're getting 503 errors from {product} on every request.", SOFTWARE),
        ("{product} has been unreachable since {time}.", EVERYTHING),
        ("{product} won't load at all, just a blank screen.", SOFTWARE[:2]),
        ("Every request to {product} times out.", SOFTWARE),
        ("Is {product} down? I can't reach it at all.", EVERYTHING),
        ("{product} went offline at {time} and hasn't come back.", EVERYTHING),
        ("{product} is totally down for me.", EVERYTHING),
    ],
}

# Optional second sentence, specific to the intent so it never hints at a different one.
DETAILS: dict[str, list[str]] = {
    "billing.refund": [
        "The charge of {amount} went through {day}.",
        "It went on my card ending in {card}.",
        "My account email is {email}.",
    ],
    "billing.invoice": [
        "It's for the {month} billing period.",
        "The invoice number is {invoice}.",
        "Our company name is {company}.",
        "Please send it to {email}.",
    ],
    "account.login": [
        "My username is {email}.",
        "I already tried clearing the cache.",
        "This started {when}.",
    ],
    "account.delete": [
        "The email on the account is {email}.",
        "Please confirm by email once it's done.",
        "My username is {email}.",
    ],
    "shipping.delay": [
        "The order number is {order}.",
        "Tracking number {tracking}.",
        "I ordered it {day}.",
    ],
    "shipping.damaged": [
        "Order {order}.",
        "I have photos of the damage if you need them.",
        "It was delivered {day}.",
    ],
    "technical.bug": [
        "I'm on version {version}.",
        "It started {when}.",
        "I already tried reinstalling.",
        "It happens every single time.",
    ],
    "technical.outage": [
        "It started {when}.",
        "Restarting on my side didn't help.",
        "Your status page says everything is fine though.",
    ],
}

# Priority cues. P1 cues only say "urgent" in some way; P3 cues only say "not urgent" in some way,
# and never by negating a P1 word ("not urgent" would put "urgent" into a P3 ticket).
P1_SENTENCES = (
    "This is urgent.",
    "Please treat this as urgent.",
    "We need this fixed ASAP.",
    "Please help ASAP.",
    "This is critical for us.",
    "We are losing money every hour this continues.",
    "Our whole team is blocked.",
    "This is an emergency.",
    "Need this resolved today.",
    "Please escalate this right away.",
    "Top priority please.",
    "This is costing us money by the minute.",
)
# Only for tickets about a service that is broken for people: "all users" makes no sense for a
# parcel that is late.
P1_SERVICE_SENTENCES = (
    "It's affecting all of our users.",
    "All users on our account are affected.",
    "Our customers can't work and we are losing sales.",
)
P1_PREFIXES = ("URGENT:", "Urgent -", "ASAP:", "CRITICAL:", "Emergency:")
P3_SENTENCES = (
    "No rush.",
    "No rush on this one.",
    "Whenever you get a chance.",
    "Low priority, just wanted to flag it.",
    "Not a big deal, whenever you have time.",
    "Take your time.",
    "No hurry at all.",
    "Mostly just curious.",
    "It can wait until next week.",
    "Whenever someone has a moment is fine.",
    "This is low priority.",
    "Just letting you know, nothing pressing.",
)
P3_PREFIXES = ("Low priority:", "No rush:", "Not pressing:")
P2_SENTENCES = (
    "Please look into it this week.",
    "We have a workaround for now, but please fix it soon.",
    "A reply in the next few days would be great.",
    "Would appreciate a fix soon.",
    "It's annoying, though we have a workaround.",
    "Hoping to get this sorted this week.",
    "Please get back to me soon.",
    "Sometime in the next few days is fine.",
)
P2_PREFIXES = ("Normal priority:", "Fairly soon please:")
SERVICE_INTENTS = ("account.login", "technical.bug", "technical.outage")

GREETINGS = (
    "Hi,",
    "Hello,",
    "Hi team,",
    "Hello support,",
    "Hey there,",
    "Good morning,",
    "Good afternoon,",
    "Dear support team,",
    "Hi Northwind,",
    "Hey folks,",
)
INTROS = (
    "This is {first} {last}.",
    "{first} here.",
    "My name is {first} {last}.",
    "{first} from {company} here.",
    "I'm {first}, a customer since {year}.",
)
CLOSINGS = (
    "Thanks.",
    "Thank you!",
    "Thanks in advance.",
    "Appreciate your help.",
    "Let me know if you need more details.",
    "Any help is appreciated.",
    "Thanks for looking into it.",
    "Looking forward to your reply.",
)
SIGNOFFS = (
    "- {first}",
    "Best, {first}",
    "Regards, {first} {last}",
    "{first} {last}",
    "Cheers, {first} {last}",
)

FIRST_NAMES = (
    "Maria", "James", "Aisha", "Tom", "Priya", "Lukas", "Chen", "Sofia", "Omar", "Emma", "Diego", "Yuki",
    "Fatima", "Noah", "Ingrid", "Kwame", "Lena", "Raj", "Olivia", "Mateo", "Hana", "Ben", "Zara", "Pavel",
    "Grace", "Ahmed", "Nina", "Samuel", "Mei", "Jonas", "Chloe", "Tariq", "Ana", "Wei", "Elif", "Liam",
)  # fmt: skip
LAST_NAMES = (
    "Lopez", "Smith", "Khan", "Becker", "Patel", "Novak", "Wang", "Rossi", "Haddad", "Brown", "Garcia",
    "Tanaka", "Ali", "Johansson", "Mensah", "Schulz", "Sharma", "Nguyen", "Kim", "Silva", "Dubois",
    "Kowalski", "Okafor", "Murphy", "Fischer", "Ivanova", "Costa", "Larsen", "Yilmaz", "Reyes",
)  # fmt: skip
COMPANIES = (
    "Acme Logistics", "Bluefin Studio", "Harbor Dental", "Pine & Co", "Redwood Labs", "Sunrise Bakery",
    "Vector Analytics", "Orchard Farms", "Keystone Legal", "Maple Fitness",
)  # fmt: skip
MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)  # fmt: skip

# Harmless misspellings real tickets have. They touch only filler words (never a product name, a
# problem word or a priority marker such as "urgent" or "no rush"), so they cannot change the record.
TYPOS = {
    "please": ("pls", "plz", "pleas"),
    "Thanks": ("Thx", "Thnaks"),
    "thanks": ("thx",),
    "really": ("realy",),
    "I'm": ("Im", "im"),
    "already": ("allready", "alredy"),
    "help": ("hlep",),
}
TYPO_RATE = 0.12

MIN_WORDS, MAX_WORDS = 15, 45


def _slots(rng: random.Random) -> dict[str, str]:
    """Fresh values for every template slot; templates use the ones they need."""
    first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
    month = rng.choice(MONTHS)
    date = rng.choice(
        [
            f"{month} {rng.randint(1, 28)}",
            f"{rng.randint(1, 28)} {month}",
            f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
            f"{rng.randint(1, 12)}/{rng.randint(1, 28)}",
        ]
    )
    weekday = rng.choice(["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"])
    day = rng.choice([f"on {date}", f"on {date}", f"last {weekday}", "yesterday", "two weeks ago"])
    hour = rng.randint(1, 12)
    return {
        "first": first,
        "last": last,
        "company": rng.choice(COMPANIES),
        "year": str(rng.randint(2015, 2023)),
        "month": month,
        "date": date,  # "March 3", "2024-03-03" ...: after "on", "from", "was"
        "day": day,  # "on March 3", "last Friday", "yesterday": a whole adverbial
        "when": rng.choice(
            ["yesterday", "this morning", "last night", f"on {date}", "after the last update"]
        ),
        "time": rng.choice([f"{hour} am", f"{hour} pm", "midnight", "noon", f"{hour}:{rng.randint(10, 59)}"]),
        "amount": rng.choice(["$", "EUR ", "£"]) + f"{rng.randint(5, 400)}.{rng.choice(['00', '49', '99'])}",
        "card": f"{rng.randint(1000, 9999)}",
        "email": f"{first.lower()}.{last.lower()}@{rng.choice(['gmail.com', 'outlook.com', 'example.com'])}",
        "invoice": f"INV-{rng.randint(2022, 2024)}-{rng.randint(1, 9999):04d}",
        "order": rng.choice(["#", "NW-", "#NW"]) + f"{rng.randint(10000, 99999)}",
        "tracking": f"1Z{rng.randint(10**9, 10**10 - 1)}",
        "version": f"{rng.randint(2, 6)}.{rng.randint(0, 19)}.{rng.randint(0, 9)}",
    }


def _sentence_start(sentence: str, after_greeting: bool) -> str:
    """Capitalize a sentence, or lower-case it after a greeting ("Hi team, the API is down.")."""
    first_word = sentence.split(" ", 1)[0].rstrip(",.")
    if not after_greeting:
        return sentence[:1].upper() + sentence[1:]
    if first_word in ("I", "I'm", "I'd") or first_word in FIRST_NAMES:
        return sentence
    return sentence[:1].lower() + sentence[1:]


def _ticket(rng: random.Random, intent: str, priority: str) -> tuple[str, str]:
    """One ticket text for this intent and priority, and the product id it names."""
    template, products = rng.choice(ISSUES[intent])
    product = rng.choice(products)
    slots = _slots(rng) | {"product": rng.choice(PRODUCTS[product])}

    sentences = [template.format(**slots)]
    if rng.random() < 0.45:
        sentences.append(rng.choice(DETAILS[intent]).format(**slots))

    # The priority cue: a prefix ("URGENT:"), or a sentence before or after the problem.
    prefix = ""
    cues = {"P1": P1_SENTENCES, "P2": P2_SENTENCES, "P3": P3_SENTENCES}[priority]
    if priority == "P1" and intent in SERVICE_INTENTS:
        cues += P1_SERVICE_SENTENCES
    if rng.random() < 0.2:
        prefix = rng.choice({"P1": P1_PREFIXES, "P2": P2_PREFIXES, "P3": P3_PREFIXES}[priority])
    elif priority == "P1" and rng.random() < 0.3:
        # "This is urgent. The API ..." reads naturally; "Take your time. The API ..." does not.
        sentences.insert(0, rng.choice(cues))
    else:
        sentences.append(rng.choice(cues))

    if rng.random() < 0.2:
        sentences.insert(0, rng.choice(INTROS).format(**slots))
    greeting = rng.choice(GREETINGS) if rng.random() < 0.45 else ""
    sentences[0] = _sentence_start(sentences[0], after_greeting=bool(greeting))
    sentences[1:] = [_sentence_start(s, after_greeting=False) for s in sentences[1:]]
    if rng.random() < 0.4:
        sentences.append(rng.choice(CLOSINGS))
    if rng.random() < 0.35:
        sentences.append(rng.choice(SIGNOFFS).format(**slots))
    text = " ".join(x for x in (prefix, greeting, *sentences) if x)

    if rng.random() < TYPO_RATE:
        words = text.split(" ")
        spots = [i for i, w in enumerate(words) if w in TYPOS]
        if spots:
            i = rng.choice(spots)
            words[i] = rng.choice(TYPOS[words[i]])
            text = " ".join(words)
    return text, product


def generate(n: int = 800, seed: int = 0) -> list[dict[str, Any]]:
    """`n` chat rows (system, ticket, JSON record), the same for the same seed.

    Intents get equal shares (in shuffled order); priorities follow PRIORITY_WEIGHTS. A ticket
    outside MIN_WORDS..MAX_WORDS or identical to an earlier one is drawn again.
    """
    rng = random.Random(seed)
    intents = [INTENTS[i % len(INTENTS)] for i in range(n)]
    rng.shuffle(intents)
    seen: set[str] = set()
    rows = []
    for intent in intents:
        priority = rng.choices(PRIORITIES, weights=PRIORITY_WEIGHTS)[0]
        while True:
            text, product = _ticket(rng, intent, priority)
            if MIN_WORDS <= len(text.split()) <= MAX_WORDS and text not in seen:
                break
        seen.add(text)
        record = {"intent": intent, "priority": priority, "product": product}
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": text},
                    {"role": "assistant", "content": json.dumps(record)},
                ]
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write synthetic Northwind Cloud support tickets as JSONL.")
    parser.add_argument("--out", required=True, type=Path, help="the JSONL file to write")
    parser.add_argument("--n", type=int, default=800, help="number of rows (default 800)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    rows = generate(args.n, args.seed)
    atomic_write_jsonl(args.out, rows)
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
