"""The time zones and currencies Lago accepts, which the emulator refuses others than (a 422, as Lago answers).

- Time zones: lago-api's ``TimezoneValidator`` takes ``UTC`` and the TZInfo names of Rails'
  ``ActiveSupport::TimeZone::MAPPING``, as Lago's OpenAPI spec lists them (``Timezone`` and ``TimezoneOrNull``: both
  spellings of the zones renamed since, ``Europe/Kyiv`` and ``Europe/Kiev``...). The spec's ``GMT+12`` is Rails'
  ``Etc/GMT+12`` ("International Date Line West"): a name no time zone database knows, so not taken.
- Currencies: lago-api's ``Currencies::ACCEPTED_CURRENCIES``, the ISO 4217 codes of the spec's ``Currency`` and
  ``CurrencyOrNull``.

``tests/test_emulator_accepted_zones_and_currencies.py`` checks these against the spec.
"""

from __future__ import annotations

#: The customer time zones Lago accepts (138).
TIMEZONES = frozenset(
    (
        "Africa/Algiers Africa/Cairo Africa/Casablanca Africa/Harare Africa/Johannesburg Africa/Monrovia "
        "Africa/Nairobi America/Argentina/Buenos_Aires America/Bogota America/Caracas America/Chicago "
        "America/Chihuahua America/Denver America/Godthab America/Guatemala America/Guyana America/Halifax "
        "America/Indiana/Indianapolis America/Juneau America/La_Paz America/Lima America/Los_Angeles America/Mazatlan "
        "America/Mexico_City America/Monterrey America/Montevideo America/New_York America/Nuuk America/Phoenix "
        "America/Puerto_Rico America/Regina America/Santiago America/Sao_Paulo America/St_Johns America/Tijuana "
        "Asia/Almaty Asia/Baghdad Asia/Baku Asia/Bangkok Asia/Chongqing Asia/Colombo Asia/Dhaka Asia/Hong_Kong "
        "Asia/Irkutsk Asia/Jakarta Asia/Jerusalem Asia/Kabul Asia/Kamchatka Asia/Karachi Asia/Kathmandu Asia/Kolkata "
        "Asia/Krasnoyarsk Asia/Kuala_Lumpur Asia/Kuwait Asia/Magadan Asia/Muscat Asia/Novosibirsk Asia/Rangoon "
        "Asia/Riyadh Asia/Seoul Asia/Shanghai Asia/Singapore Asia/Srednekolymsk Asia/Taipei Asia/Tashkent "
        "Asia/Tbilisi Asia/Tehran Asia/Tokyo Asia/Ulaanbaatar Asia/Urumqi Asia/Vladivostok Asia/Yakutsk Asia/Yangon "
        "Asia/Yekaterinburg Asia/Yerevan Atlantic/Azores Atlantic/Cape_Verde Atlantic/South_Georgia "
        "Australia/Adelaide Australia/Brisbane Australia/Darwin Australia/Hobart Australia/Melbourne Australia/Perth "
        "Australia/Sydney Etc/GMT+12 Europe/Amsterdam Europe/Athens Europe/Belgrade Europe/Berlin Europe/Bratislava "
        "Europe/Brussels Europe/Bucharest Europe/Budapest Europe/Copenhagen Europe/Dublin Europe/Helsinki "
        "Europe/Istanbul Europe/Kaliningrad Europe/Kiev Europe/Kyiv Europe/Lisbon Europe/Ljubljana Europe/London "
        "Europe/Madrid Europe/Minsk Europe/Moscow Europe/Paris Europe/Prague Europe/Riga Europe/Rome Europe/Samara "
        "Europe/Sarajevo Europe/Skopje Europe/Sofia Europe/Stockholm Europe/Tallinn Europe/Vienna Europe/Vilnius "
        "Europe/Volgograd Europe/Warsaw Europe/Zagreb Europe/Zurich Pacific/Apia Pacific/Auckland Pacific/Chatham "
        "Pacific/Fakaofo Pacific/Fiji Pacific/Guadalcanal Pacific/Guam Pacific/Honolulu Pacific/Majuro Pacific/Midway "
        "Pacific/Noumea Pacific/Pago_Pago Pacific/Port_Moresby Pacific/Tongatapu UTC"
    ).split()
)

#: The currencies Lago accepts (138).
CURRENCIES = frozenset(
    (
        "AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BIF BMD BND BOB BRL BSD BWP BYN BZD CAD CDF CHF CLF "
        "CLP CNY COP CRC CVE CZK DJF DKK DOP DZD EGP ETB EUR FJD FKP GBP GEL GHS GIP GMD GNF GTQ GYD HKD HNL HRK HTG "
        "HUF IDR ILS INR ISK JMD JPY KES KGS KHR KMF KRW KYD KZT LAK LBP LKR LRD LSL MAD MDL MGA MKD MMK MNT MOP MRO "
        "MUR MVR MWK MXN MYR MZN NAD NGN NIO NOK NPR NZD PAB PEN PGK PHP PKR PLN PYG QAR RON RSD RUB RWF SAR SBD SCR "
        "SEK SGD SHP SLL SOS SRD STD SZL THB TJS TOP TRY TTD TWD TZS UAH UGX USD UYU UZS VND VUV WST XAF XCD XOF XPF "
        "YER ZAR ZMW"
    ).split()
)
